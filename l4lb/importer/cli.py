"""The body of `l4lb import` (the typer command in l4lb/cli.py only forwards its arguments here)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from l4lb.importer.common import Options
from l4lb.importer.convert import FORMATS, import_files
from l4lb.importer.report import ImportFailed


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory: all or nothing."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def run(files: list[str], *, node: str | None, interfaces: list[str], config_id: str | None,
        vips: list[str], output: str | None, quiet: bool = False) -> int:
    """Convert, print the report on stderr, write the TOML to `output` (or stdout). Returns the exit code."""
    fmt = None
    if len(files) >= 2 and files[0] in FORMATS:
        fmt, files = files[0], files[1:]
    if output is not None:
        parent = Path(output).parent
        if not parent.is_dir():
            print(f"l4lb: error: -o {output}: directory {parent} does not exist", file=sys.stderr)
            return 2
    try:
        res = import_files(files, Options(node=node, interfaces=list(interfaces), config_id=config_id,
                                          vips=list(vips)), fmt=fmt)
    except ImportFailed as e:
        print("l4lb: import failed; nothing written:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    if not quiet:
        lines = res.report.lines()
        if lines:
            print(f"l4lb import: {len(lines)} setting(s) converted with a different meaning or dropped:",
                  file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
    if output is None:
        sys.stdout.write(res.text)
    else:
        try:
            write_atomic(output, res.text)
        except OSError as e:
            print(f"l4lb: error: cannot write {output}: {e.strerror or e}", file=sys.stderr)
            return 1
        if not quiet:
            print(f"l4lb import: wrote {output}; check it with `l4lb check -c {output}`", file=sys.stderr)
    return 0
