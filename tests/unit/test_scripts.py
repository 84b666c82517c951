"""l4lb.scripts: process groups killed whole, minimal environment, script security."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest

from l4lb import scripts
from l4lb.config import check_system, config_from_dict


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    """A root-owned 0755 directory for scripts (pytest's tmp_path is 0700, under /tmp)."""
    d = tmp_path / "bin"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def write(path: Path, text: str, mode: int = 0o755) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def gone(pid: int, timeout: float = 3.0) -> bool:
    """True once `pid` no longer runs (exited and reaped, or a zombie)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def live_members(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies do not count: init reaps them)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(f[2]) == pgid and f[0] != "Z":
                out.append(int(d))
    return out


# ------------------------------------------------------------ process groups

def test_timeout_kills_the_whole_group_grandchild_included(bindir, tmp_path):
    pids = tmp_path / "pids"
    # The script forks a grandchild (a shell running sleep) and hangs waiting for it.
    s = write(bindir / "hang", f"#!/bin/sh\necho $$ > {pids}\n"
                               f"sh -c 'echo $$ >> {pids}; exec sleep 300' &\nwait\n")

    async def run():
        t0 = time.monotonic()
        res = await scripts.run([str(s)], 0.5)
        return res, time.monotonic() - t0

    res, took = asyncio.run(run())
    assert res.rc is None and not res.ok
    assert res.detail == "timed out after 0.5s; process group killed"
    assert took < 5.0
    leader, grandchild = (int(x) for x in pids.read_text().split())
    assert gone(grandchild), "the grandchild survived the timeout"
    assert gone(leader)
    assert live_members(leader) == []


def test_a_grandchild_that_calls_setsid_is_killed_too(bindir, tmp_path):
    """It leaves the process group; the script's cgroup still holds it."""
    assert scripts._cgroup_root() is not None, "this machine has a writable cgroup v2"
    pids = tmp_path / "pids"
    s = write(bindir / "escape", f"#!/bin/sh\nsetsid sh -c 'echo $$ > {pids}; exec sleep 300' &\n"
                                 "wait\n")
    res = asyncio.run(scripts.run([str(s)], 0.5))
    assert res.rc is None and res.detail.startswith("timed out")
    pid = int(pids.read_text())
    assert gone(pid), "the setsid grandchild survived the timeout"
    ours = [d for d in scripts._cgroup_root().iterdir() if d.name.startswith(f"{os.getpid()}-")]
    assert ours == [], "a script cgroup was left"


def test_without_cgroups_scripts_still_run_in_their_group(bindir, tmp_path, monkeypatch):
    monkeypatch.setattr(scripts, "_cg_state", {"root": None, "n": 0, "stale": set()})
    pids = tmp_path / "pids"
    s = write(bindir / "hang", f"#!/bin/sh\nsh -c 'echo $$ > {pids}; exec sleep 300' &\nwait\n")
    res = asyncio.run(scripts.run([str(s)], 0.5))
    assert res.rc is None and gone(int(pids.read_text()))
    assert asyncio.run(scripts.run(["/bin/true"], 5)).ok


def test_a_notify_helper_keeps_its_cgroup_until_it_exits(bindir, tmp_path):
    pids = tmp_path / "pids"
    s = write(bindir / "bg", f"#!/bin/sh\nsetsid sh -c 'echo $$ > {pids}; exec sleep 300' &\n"
                             "while [ ! -s " + str(pids) + " ]; do sleep 0.01; done\n")
    before = set(scripts._cg_state.get("stale", ()))
    assert asyncio.run(scripts.run([str(s)], 5, kill_leftovers=False)).ok
    pid = int(pids.read_text())
    (left,) = scripts._cg_state["stale"] - before
    assert left.is_dir() and not gone(pid, timeout=0.2)
    os.kill(pid, 9)
    assert gone(pid)
    time.sleep(0.1)
    assert asyncio.run(scripts.run(["/bin/true"], 5)).ok  # the next start sweeps it
    assert not left.exists() and left not in scripts._cg_state["stale"]


def test_cancel_kills_the_group(bindir, tmp_path):
    pids = tmp_path / "pids"
    s = write(bindir / "hang", f"#!/bin/sh\nsh -c 'echo $$ > {pids}; exec sleep 300' &\nwait\n")

    async def run():
        t = asyncio.create_task(scripts.run([str(s)], 60))
        for _ in range(200):
            if pids.exists() and pids.read_text().strip():
                break
            await asyncio.sleep(0.02)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(run())
    assert gone(int(pids.read_text()))


def test_check_leaves_nothing_behind_but_notify_may(bindir, tmp_path):
    pids = tmp_path / "pids"
    s = write(bindir / "bg", f"#!/bin/sh\nsh -c 'echo $$ > {pids}; exec sleep 300' &\n"
                             "while [ ! -s " + str(pids) + " ]; do sleep 0.01; done\nexit 3\n")

    async def run(kill: bool):
        pids.unlink(missing_ok=True)
        return await scripts.run([str(s)], 5, kill_leftovers=kill)

    res = asyncio.run(run(True))
    assert res.rc == 3 and res.detail == "exited 3"
    assert gone(int(pids.read_text()))
    res = asyncio.run(run(False))  # notify commands may start helpers
    pid = int(pids.read_text())
    try:
        assert not gone(pid, timeout=0.3)
    finally:
        os.kill(pid, 9)


def test_exit_codes_and_missing_programs(bindir):
    ok = write(bindir / "ok", "#!/bin/sh\nexit 0\n")
    bad = write(bindir / "bad", "#!/bin/sh\nexit 7\n")
    sig = write(bindir / "sig", "#!/bin/sh\nkill -9 $$\n")

    async def run():
        return [await scripts.run(argv, 5) for argv in
                ([str(ok)], [str(bad)], [str(sig)], ["true"], [str(bindir / "nope")],
                 ["no-such-program-l4lb"], [])]

    r = asyncio.run(run())
    assert r[0].ok and r[0].rc == 0 and r[0].detail == ""
    assert (r[1].rc, r[1].detail) == (7, "exited 7")
    assert (r[2].rc, r[2].detail) == (-9, "killed by signal 9")
    assert r[3].ok  # a bare name is looked up in the safe PATH
    assert r[4].rc is None and "No such file or directory" in r[4].detail
    assert r[5].rc is None and "not found in /usr/sbin:/usr/bin:/sbin:/bin" in r[5].detail
    assert r[6].detail == "empty command"


# ---------------------------------------------------------------- environment

def test_environment_is_minimal(bindir, tmp_path, monkeypatch):
    out = tmp_path / "env.json"
    # /proc/self/environ: what exec() got (Python itself adds LC_CTYPE to os.environ)
    s = write(bindir / "env", "#!/usr/bin/python3\nimport json, os\n"
                              "env = open('/proc/self/environ', 'rb').read().decode()\n"
                              "env = dict(v.split('=', 1) for v in env.split('\\0') if v)\n"
                              f"json.dump(env, open({str(out)!r}, 'w'))\n"
                              f"open({str(out)!r} + '.cwd', 'w').write(os.getcwd())\n")
    monkeypatch.setenv("L4LB_SECRET_OF_THE_DAEMON", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    res = asyncio.run(scripts.run([str(s)], 10, {"L4LB_REAL": "10.0.0.1", "L4LB_PORT": 80}))
    assert res.ok, res
    assert json.loads(out.read_text()) == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                           "LANG": "C", "L4LB_REAL": "10.0.0.1",
                                           "L4LB_PORT": "80"}
    assert Path(str(out) + ".cwd").read_text() == "/"


def test_only_l4lb_variables_may_be_passed():
    with pytest.raises(ValueError, match="'LD_PRELOAD' must start with L4LB_"):
        scripts.script_env({"LD_PRELOAD": "/tmp/x.so"})


# ------------------------------------------------------------ script security

def test_world_writable_script_is_refused_with_the_fix(bindir, tmp_path, caplog):
    marker = tmp_path / "ran"
    s = write(bindir / "ww", f"#!/bin/sh\ntouch {marker}\n", 0o757)
    with pytest.raises(scripts.ScriptRefused) as e:
        scripts.check_script(str(s))
    assert str(e.value) == (
        f"script {s} is writable by others (mode 0757), so a non-root user could change what "
        f"l4lb runs as root; fix: chown root:root {s} && chmod go-w {s} (or set [node] "
        "script_security = false)")
    res = asyncio.run(scripts.run([str(s)], 5))
    assert res.rc is None and res.detail == f"refused: {e.value}"
    assert not marker.exists()
    res = asyncio.run(scripts.run([str(s)], 5))  # refused again, logged once
    assert sum("not running" in r.getMessage() for r in caplog.records) == 1
    # with script security off, it runs
    assert asyncio.run(scripts.run([str(s)], 5, security=False)).ok
    assert marker.exists()


def test_group_writable_or_foreign_scripts_and_directories_are_refused(bindir, tmp_path):
    ok = write(bindir / "ok", "#!/bin/sh\nexit 0\n")
    assert scripts.check_script(str(ok)) == str(ok)
    gw = write(bindir / "gw", "#!/bin/sh\n", 0o775)
    with pytest.raises(scripts.ScriptRefused, match=r"is writable by group \(mode 0775\)"):
        scripts.check_script(str(gw))
    nobody = write(bindir / "nobody", "#!/bin/sh\n")
    os.chown(nobody, 65534, 65534)
    with pytest.raises(scripts.ScriptRefused, match="owned by uid 65534, not root"):
        scripts.check_script(str(nobody))
    noexec = write(bindir / "noexec", "#!/bin/sh\n", 0o644)
    with pytest.raises(scripts.ScriptRefused, match="not executable; chmod 755"):
        scripts.check_script(str(noexec))

    # a directory others can write: they could swap the script
    wdir = tmp_path / "open"
    wdir.mkdir()
    wdir.chmod(0o777)
    inside = write(wdir / "s", "#!/bin/sh\n")
    with pytest.raises(scripts.ScriptRefused) as e:
        scripts.check_script(str(inside))
    assert f"script {inside}: directory {wdir} is writable by group and others (mode 0777)" \
        in str(e.value)
    assert f"chown root:root {wdir} && chmod go-w {wdir}" in str(e.value)
    # ...unless it is sticky, like /tmp
    wdir.chmod(0o1777)
    assert scripts.check_script(str(inside)) == str(inside)

    # a safe-looking path that is a symlink to an unsafe place, and the reverse
    wdir.chmod(0o777)
    link = bindir / "link"
    link.symlink_to(inside)
    with pytest.raises(scripts.ScriptRefused, match=re.escape(f"directory {wdir} is writable")):
        scripts.check_script(str(link))
    link2 = wdir / "link2"
    link2.symlink_to(ok)
    with pytest.raises(scripts.ScriptRefused, match=re.escape(f"directory {wdir} is writable")):
        scripts.check_script(str(link2))


def test_check_system_refuses_unsafe_scripts_at_start(bindir):
    s = write(bindir / "check", "#!/bin/sh\nexit 0\n", 0o777)
    data = {"node": {"name": "lb1", "interfaces": ["lo"]},
            "healthcheck": {"type": "script", "script": [str(s)]}}
    errs = [e for e in check_system(config_from_dict(data)) if "script" in e]
    assert errs == [f"healthcheck.script[0]: script {s} is writable by group and others "
                    f"(mode 0777), so a non-root user could change what l4lb runs as root; fix: "
                    f"chown root:root {s} && chmod go-w {s} (or set [node] script_security = "
                    "false)"]
    data["node"]["script_security"] = False
    assert [e for e in check_system(config_from_dict(data)) if "script" in e] == []
    s.chmod(0o755)
    data["node"]["script_security"] = True
    assert [e for e in check_system(config_from_dict(data)) if "script" in e] == []
