"""Running operator scripts: health `script` checks, VRRP track scripts, notify commands.

A script can neither freeze the daemon nor escape it:

* **Process group.**  Each script starts in its own session (start_new_session),
  so it and everything it forks share one process group; on timeout, or when the
  caller is cancelled, the whole group gets SIGKILL, not only the direct child
  (a shell script's hung ``sleep`` or ``curl`` goes too).  Checks also kill what
  is left of the group after the script exits (a check runs every few seconds:
  leftovers would pile up); notify commands may leave helpers running.
* **Cgroup.**  A grandchild that calls setsid() leaves the process group, so
  where the cgroup v2 hierarchy is writable each script also starts in a cgroup
  of its own (``<our cgroup>/l4lb-scripts/<n>``: a ``/bin/sh`` wrapper moves
  itself in, then execs the script, so nothing it forks is ever outside), and a
  kill is ``cgroup.kill``: every process in it, whatever its session.  Emptied
  cgroups are removed; without cgroup v2 the process group is all there is.
* **Minimal environment.**  ``PATH=/usr/sbin:/usr/bin:/sbin:/bin``, ``LANG=C``
  and the ``L4LB_*`` variables the caller documents, nothing of the daemon's
  own environment.  Health checks pass ``L4LB_VIP`` ("addr:port/proto"),
  ``L4LB_REAL`` and ``L4LB_PORT``; VRRP passes ``L4LB_INSTANCE`` and, to notify
  commands, ``L4LB_STATE`` and ``L4LB_PRIORITY``.
* **Script security** (keepalived's ``enable_script_security``; on unless
  ``[node] script_security = false``).  The daemon runs as root, so whoever can
  change a script it runs is root too.  The program (argv[0]) must be owned by
  root and not writable by group or others, and so must every directory above
  it (a directory with the sticky bit, like /tmp, is allowed: nobody can replace
  another's file there).  Both the path as given and the path its symlinks
  resolve to are checked.  Arguments are not checked (an interpreter's script
  argument is the operator's business, as in keepalived).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from l4lb.errors import L4lbError

log = logging.getLogger("l4lb.scripts")

SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {"PATH": SAFE_PATH, "LANG": "C"}
ENV_PREFIX = "L4LB_"
KILL_WAIT_S = 5.0  # a SIGKILLed leader is reaped well within this

_security = True  # set once from [node] script_security by the daemon
_refusals: set[str] = set()  # refusals already logged


class ScriptRefused(L4lbError):
    """The script is unsafe to run as root (or cannot be found); the message says the fix."""


def configure(security: bool = True) -> None:
    """Process-wide policy, from ``[node] script_security`` (the daemon sets it at start)."""
    global _security
    _security = bool(security)


def resolve(argv0: str) -> str:
    """argv[0] as an absolute path: a bare name is looked up in SAFE_PATH only."""
    if not argv0:
        raise ScriptRefused("empty program name")
    if "/" not in argv0:
        found = shutil.which(argv0, path=SAFE_PATH)
        if found is None:
            raise ScriptRefused(f"{argv0!r} is not found in {SAFE_PATH}; give an absolute path")
        return found
    return os.path.abspath(argv0)


def _unsafe(path: str, st: os.stat_result, is_dir: bool) -> str | None:
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if is_dir and st.st_mode & stat.S_ISVTX:
        return None  # sticky: others cannot replace root's files in it
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "group and others" if st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IWOTH \
            else "group" if st.st_mode & stat.S_IWGRP else "others"
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _chain(path: str) -> list[str]:
    """path and every directory above it, up to /."""
    out = [path]
    while path != "/":
        path = os.path.dirname(path)
        out.append(path)
    return out


def check_script(argv0: str) -> str:
    """The absolute path of a script that is safe to run as root, else ScriptRefused.

    The error names the offending path and the fix
    (``chown root:root PATH && chmod go-w PATH``)."""
    path = resolve(argv0)
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise ScriptRefused(f"script {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ScriptRefused(f"script {path}: not a regular file")
    if not st.st_mode & 0o111:
        raise ScriptRefused(f"script {path}: not executable; chmod 755 {path}")
    seen: set[str] = set()
    for chain in (_chain(path), _chain(real)):
        for i, p in enumerate(chain):
            if p in seen:
                continue
            seen.add(p)
            try:
                pst = os.lstat(p)
            except OSError as e:
                raise ScriptRefused(f"script {path}: {p}: {e.strerror}") from None
            if stat.S_ISLNK(pst.st_mode):
                # A symlink's own mode means nothing; who owns it says who can repoint it,
                # and its directory is checked next.
                why = None if pst.st_uid == 0 else f"a symlink owned by uid {pst.st_uid}"
            else:
                why = _unsafe(p, pst, is_dir=i > 0)
            if why:
                what = "script" if p in (path, real) else f"script {path}: directory"
                raise ScriptRefused(
                    f"{what} {p} is {why}, so a non-root user could change what l4lb runs as "
                    f"root; fix: chown root:root {p} && chmod go-w {p} (or set [node] "
                    "script_security = false)")
    return path


def script_env(extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """BASE_ENV plus the caller's L4LB_* variables (other names are a programming error)."""
    env = dict(BASE_ENV)
    for k, v in (extra or {}).items():
        if not k.startswith(ENV_PREFIX):
            raise ValueError(f"script environment variable {k!r} must start with {ENV_PREFIX}")
        env[k] = str(v)
    return env


@dataclass(frozen=True)
class Result:
    rc: int | None  # None: not run, or killed on timeout
    detail: str = ""  # "" when the script exited 0, else what went wrong

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.detail


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


# The sh wrapper: move this shell into the cgroup given as $0, then become the script
# (same pid: the session leader). A failed move still runs the script (process group only).
_CG_WRAP = 'echo 0 2>/dev/null > "$0/cgroup.procs"; unset PWD; exec "$@"'
_cg_state: dict = {}  # "root": Path | None once probed; "n": a counter; "stale": set[Path]


def _cgroup_root() -> Path | None:
    """<cgroup2 mount>/<our cgroup>/l4lb-scripts, made once; None without cgroup v2."""
    if "root" in _cg_state:
        return _cg_state["root"]
    root = None
    try:
        mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()
                  if ln.split()[2:3] == ["cgroup2"]]
        own = next((ln[3:] for ln in Path("/proc/self/cgroup").read_text().splitlines()
                    if ln.startswith("0::")), None)
        if mounts and own is not None:
            d = Path(mounts[0]) / own.lstrip("/") / "l4lb-scripts"
            d.mkdir(exist_ok=True)
            if (d / "cgroup.procs").exists():
                root = d
    except (OSError, StopIteration, IndexError) as e:
        log.info("scripts run in process groups only (no writable cgroup v2: %s)", e)
    _cg_state.update(root=root, n=0, stale=set())
    return root


def _new_cgroup() -> Path | None:
    root = _cgroup_root()
    if root is None:
        return None
    for d in list(_cg_state["stale"]):  # emptied since: remove now
        _rm_cgroup(d)
    _cg_state["n"] += 1
    d = root / f"{os.getpid()}-{_cg_state['n']}"
    try:
        d.mkdir()
    except OSError:
        return None
    return d


def _kill_cgroup(d: Path) -> None:
    try:
        (d / "cgroup.kill").write_text("1")  # kernel >= 5.14: every member, atomically
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    for _ in range(3):  # older kernels: kill what is listed (forks may race: retry)
        try:
            pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _rm_cgroup(d: Path) -> None:
    """Remove an emptied cgroup; one still populated (a notify helper) is retried later."""
    try:
        d.rmdir()
        _cg_state["stale"].discard(d)
    except FileNotFoundError:
        _cg_state["stale"].discard(d)
    except OSError:
        _cg_state["stale"].add(d)


class Running:
    """A started script; `finish()` waits for it, bounded."""

    def __init__(self, argv: Sequence[str], proc: asyncio.subprocess.Process,
                 cgroup: Path | None = None) -> None:
        self.argv = list(argv)
        self.proc = proc
        self.pgid = proc.pid  # a session leader's pid is its group id
        self.cgroup = cgroup

    def kill(self) -> None:
        """SIGKILL the whole process group, and everything in the script's cgroup."""
        _killpg(self.pgid)
        if self.cgroup is not None:
            _kill_cgroup(self.cgroup)

    async def _release(self, killed: bool) -> None:
        """Remove the script's cgroup; after a kill, once its members are gone (bounded)."""
        if self.cgroup is None:
            return
        for _ in range(50 if killed else 0):  # SIGKILLed members exit within milliseconds
            try:
                if "populated 0" in (self.cgroup / "cgroup.events").read_text():
                    break
            except OSError:
                break
            await asyncio.sleep(0.01)
        _rm_cgroup(self.cgroup)

    async def finish(self, timeout: float, *, kill_leftovers: bool = True,
                     kill_on_cancel: bool = True) -> Result:
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.kill()
            try:
                await asyncio.wait_for(self.proc.wait(), KILL_WAIT_S)
            except asyncio.TimeoutError:
                pass
            await self._release(True)
            return Result(None, f"timed out after {timeout:g}s; process group killed")
        except BaseException:  # cancelled: leave nothing behind, unless told to
            if kill_on_cancel:
                self.kill()
            if self.cgroup is not None:
                _cg_state["stale"].add(self.cgroup)  # cancelled: no awaiting here
            raise
        if kill_leftovers:
            self.kill()
        await self._release(kill_leftovers)
        return Result(rc, "" if rc == 0 else
                      f"killed by signal {-rc}" if rc < 0 else f"exited {rc}")


async def start(argv: Sequence[str], env: Mapping[str, object] | None = None, *,
                security: bool | None = None) -> Running | Result:
    """Start argv (no shell, output discarded, cwd /, own session): a Running, or a
    Result saying why it was not started (refused by script security, not found...)."""
    if not argv:
        return Result(None, "empty command")
    try:
        # The program that is checked is the one that runs (a bare name: from SAFE_PATH).
        prog = check_script(argv[0]) if (security if security is not None else _security) \
            else resolve(argv[0])
    except ScriptRefused as e:
        if str(e) not in _refusals:  # once per reason, not every interval
            _refusals.add(str(e))
            log.error("not running %s: %s", argv[0], e)
        return Result(None, f"refused: {e}")
    cg = _new_cgroup()
    cmd = [prog, *argv[1:]] if cg is None else ["/bin/sh", "-c", _CG_WRAP, str(cg), prog,
                                                 *argv[1:]]
    try:
        os.stat(prog)  # missing or not executable: said here, not as the wrapper's exit code
        if not os.access(prog, os.X_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, env=script_env(env),
            cwd="/")
    except (OSError, ValueError) as e:
        if cg is not None:
            _rm_cgroup(cg)
        return Result(None, f"cannot run {argv[0]}: {getattr(e, 'strerror', None) or e}")
    return Running(argv, proc, cg)


async def run(argv: Sequence[str], timeout: float, env: Mapping[str, object] | None = None,
              *, kill_leftovers: bool = True, security: bool | None = None) -> Result:
    """Run argv and wait at most `timeout` seconds; the whole group is killed on timeout
    and when the caller is cancelled.  Never raises for a script's failure: a refused,
    missing, failing or hung script is a Result with a detail."""
    r = await start(argv, env, security=security)
    if isinstance(r, Result):
        return r
    return await r.finish(timeout, kill_leftovers=kill_leftovers)
