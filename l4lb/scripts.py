"""Running operator scripts: health `script` checks, VRRP track scripts, notify commands.

A script can neither freeze the daemon nor escape it:

* **Process group.**  Each script starts in its own session (start_new_session),
  so it and everything it forks share one process group; on timeout, or when the
  caller is cancelled, the whole group gets SIGKILL, not only the direct child
  (a shell script's hung ``sleep`` or ``curl`` goes too).  Checks also kill what
  is left of the group after the script exits (a check runs every few seconds:
  leftovers would pile up); notify commands may leave helpers running.  A
  grandchild that calls setsid() itself leaves the group and is not followed.
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
import logging
import os
import shutil
import signal
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


class Running:
    """A started script; `finish()` waits for it, bounded."""

    def __init__(self, argv: Sequence[str], proc: asyncio.subprocess.Process) -> None:
        self.argv = list(argv)
        self.proc = proc
        self.pgid = proc.pid  # a session leader's pid is its group id

    def kill(self) -> None:
        """SIGKILL the whole process group."""
        _killpg(self.pgid)

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
            return Result(None, f"timed out after {timeout:g}s; process group killed")
        except BaseException:  # cancelled: leave nothing behind, unless told to
            if kill_on_cancel:
                self.kill()
            raise
        if kill_leftovers:
            self.kill()
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
    try:
        proc = await asyncio.create_subprocess_exec(
            prog, *argv[1:], stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, env=script_env(env),
            cwd="/")
    except (OSError, ValueError) as e:
        return Result(None, f"cannot run {argv[0]}: {getattr(e, 'strerror', None) or e}")
    return Running(argv, proc)


async def run(argv: Sequence[str], timeout: float, env: Mapping[str, object] | None = None,
              *, kill_leftovers: bool = True, security: bool | None = None) -> Result:
    """Run argv and wait at most `timeout` seconds; the whole group is killed on timeout
    and when the caller is cancelled.  Never raises for a script's failure: a refused,
    missing, failing or hung script is a Result with a detail."""
    r = await start(argv, env, security=security)
    if isinstance(r, Result):
        return r
    return await r.finish(timeout, kill_leftovers=kill_leftovers)
