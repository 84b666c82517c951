"""Helpers shared by the benches: run metadata, plain-text and Markdown tables, JSON output.

Pure Python, no BPF and no root: the unit tests import this directly.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command_line(argv: list[str] | None = None, executable: str | None = None) -> str:
    """The command that ran this bench, as one could paste it from the repository root.
    Benches run as modules (`python -m bench.pps`: bench/ imports l4lb and its siblings
    without touching sys.path), so a script path under bench/ is recorded as `-m bench.NAME`."""
    argv = list(sys.argv if argv is None else argv)
    exe = Path(executable or sys.executable)
    if argv and argv[0].endswith(".py"):
        script = (ROOT / argv[0]).resolve()  # an absolute argv[0] stays as it is
        if script.parent == ROOT / "bench":
            argv[:1] = ["-m", f"bench.{script.stem}"]
    parts = []
    for p in [str(exe)] + argv:
        path = Path(p)
        if path.is_absolute():
            try:
                p = str(path.relative_to(ROOT))
            except ValueError:
                pass
        parts.append(p)
    return shlex.join(parts)


def run_meta(quick: bool, argv: list[str] | None = None) -> dict:
    """kernel, command, quick, timestamp: the keys every bench's JSON carries."""
    return {
        "kernel": platform.release(),
        "command": command_line(argv),
        "quick": bool(quick),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cells(rows) -> list[list[str]]:
    return [[str(c) for c in r] for r in rows]


def text_table(headers: list[str], rows, right: set[int] | None = None) -> str:
    """A fixed-width table; columns in `right` (indices) are right-aligned."""
    right = set(range(1, len(headers))) if right is None else right
    body = _cells(rows)
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def markdown_table(headers: list[str], rows, right: set[int] | None = None) -> str:
    right = set(range(1, len(headers))) if right is None else right
    sep = ["---:" if i in right else "---" for i in range(len(headers))]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in _cells(rows)]
    return "\n".join(out)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write `data` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------- machine load
def cpu_snapshot(stat_text: str | None = None) -> dict:
    """CPU time from /proc/stat (all CPUs, seconds) and this process's own CPU time."""
    if stat_text is None:
        with open("/proc/stat") as f:
            stat_text = f.read()
    fields = [int(x) for x in stat_text.splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    # user nice system idle iowait irq softirq steal (guest times are inside user)
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    t = os.times()
    return {"busy_s": (user + nice + system + irq + softirq) / hz, "steal_s": steal / hz,
            "idle_s": (idle + iowait) / hz, "own_s": t.user + t.system,
            "wall_s": time.monotonic()}


def other_load(before: dict, after: dict) -> dict:
    """What the rest of the machine did meanwhile: CPUs kept busy by other processes
    (0.0 = quiet, 1.0 = one CPU's worth) and CPUs' worth of time stolen by the host."""
    wall = max(after["wall_s"] - before["wall_s"], 1e-9)
    busy = after["busy_s"] - before["busy_s"]
    own = after["own_s"] - before["own_s"]
    return {"other_cpus_busy": round(max(busy - own, 0.0) / wall, 2),
            "steal_cpus": round((after["steal_s"] - before["steal_s"]) / wall, 2)}
