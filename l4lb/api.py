"""The local control API: JSON lines over a root-only unix socket.

Request:  {"cmd": "real_weight", "args": {"vip": "10.99.0.100:80/tcp", ...}}
Response: {"ok": true, "result": ...} or {"ok": false, "error": "what is wrong"}
Changes go through Daemon.change(): validated as a whole config, applied
atomically, or refused with nothing applied.

A client has READ_TIMEOUT seconds to send its request line; at most MAX_CLIENTS are
connected at once (a new one pushes out the longest-waiting client that has not sent
a request yet; when all are busy with requests the new one is refused).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from pathlib import Path

from l4lb.config import ConfigError
from l4lb.errors import L4lbError

log = logging.getLogger("l4lb.api")
MAX_REQUEST = 1 << 20
READ_TIMEOUT = 5.0  # seconds to send the request line
WRITE_TIMEOUT = 10.0  # seconds for the client to take the answer
MAX_CLIENTS = 64


class ApiError(L4lbError):
    """A request the daemon refused or could not answer; the message says why."""


def _vip_index(data: dict, key: str) -> int:
    # By key on the dict itself: no second parse of the whole config per change.
    from l4lb.config import _canonical_vip_key, vip_key  # noqa: PLC0415

    want = _canonical_vip_key(key)
    for i, v in enumerate(data.get("vip", [])):
        if want is not None and want == vip_key(ipaddress.ip_address(v["address"]), v["port"],
                                                v.get("protocol", "tcp")):
            return i
    raise ApiError(f"no VIP {key!r}; `l4lb status` lists them (form: 10.0.0.1:80/tcp, "
                   "[fd00::1]:80/tcp)")


def _real_index(vip: dict, address: str) -> int:
    try:
        want = ipaddress.ip_address(address)
    except ValueError:
        raise ApiError(f"address: {address!r} is not an IP address") from None
    reals = vip.get("real", [])
    spelled = str(want)  # how the config's dict form spells it: found without parsing 1,000
    for i, r in enumerate(reals):
        if r.get("address") == spelled:
            return i
    for i, r in enumerate(reals):
        if ipaddress.ip_address(r["address"]) == want:
            return i
    raise ApiError(f"VIP has no real {address}")


def _need(args: dict, *names: str) -> list:
    missing = [n for n in names if args.get(n) in (None, "")]
    if missing:
        raise ApiError(f"missing argument(s): {', '.join(missing)}")
    return [args[n] for n in names]


async def handle(daemon, cmd: str, args: dict):
    if cmd == "status":
        return daemon.status()
    if cmd == "stats":
        return daemon.stats()
    if cmd == "conns":
        limit = args.get("limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ApiError("limit: must be a positive integer")
        try:
            return await daemon.conns(args.get("vip"), limit)
        except KeyError:
            raise ApiError(f"no VIP {args.get('vip')!r}") from None
    if cmd == "reload":
        return await daemon.reload()
    if cmd == "drain":  # ECMP mode: withdraw, forward bgp.drain_s, stop (unless stop=false)
        try:
            return await daemon.drain(stop=args.get("stop", True) is not False)
        except ValueError as e:
            raise ApiError(str(e)) from None
    if cmd == "stop":
        daemon.full_stop = True
        daemon.stop_event.set()
        return {"stopping": True}

    if cmd == "vip_add":
        (address, port) = _need(args, "address", "port")
        vip = {k: args[k] for k in ("address", "port", "protocol", "mode", "hash", "ring_size",
                                    "all_down") if args.get(k) is not None}
        vip["real"] = args.get("reals", [])

        def mut(d):
            d.setdefault("vip", []).append(vip)
    elif cmd == "vip_del":
        (key,) = _need(args, "vip")

        def mut(d):
            d["vip"].pop(_vip_index(d, key))
    elif cmd in ("real_add", "real_del", "real_weight", "real_drain"):
        key, address = _need(args, "vip", "address")

        def mut(d):
            v = d["vip"][_vip_index(d, key)]
            if cmd == "real_add":
                r = {"address": address, "weight": args.get("weight", 100)}
                if args.get("mac"):
                    r["mac"] = args["mac"]
                v.setdefault("real", []).append(r)
            elif cmd == "real_del":
                v["real"].pop(_real_index(v, address))
            elif cmd == "real_weight":
                (w,) = _need(args, "weight")
                v["real"][_real_index(v, address)]["weight"] = w
            else:
                v["real"][_real_index(v, address)]["weight"] = 0
    else:
        raise ApiError(f"unknown command {cmd!r}")
    cfg = await daemon.change(mut)
    return {"vips": [v.key for v in cfg.vips]}


class _Clients:
    """The connected clients: those still sending their request (evictable, oldest
    first) and those being answered."""

    def __init__(self, cap: int):
        self.cap = cap
        self.waiting: dict[asyncio.StreamWriter, float] = {}  # insertion order = age
        self.busy: set[asyncio.StreamWriter] = set()
        self.evicted = self.refused = self.timed_out = 0

    def admit(self, w: asyncio.StreamWriter) -> bool:
        if len(self.waiting) + len(self.busy) >= self.cap:
            if not self.waiting:
                self.refused += 1
                return False
            old = next(iter(self.waiting))
            del self.waiting[old]
            self.evicted += 1
            _say(old, f"closed: more than {self.cap} API clients; this one sent no request")
            old.close()  # its reader sees EOF and its task ends
        self.waiting[w] = time.monotonic()
        return True

    def working(self, w: asyncio.StreamWriter) -> None:
        self.waiting.pop(w, None)
        self.busy.add(w)

    def leave(self, w: asyncio.StreamWriter) -> None:
        self.waiting.pop(w, None)
        self.busy.discard(w)


def _say(writer: asyncio.StreamWriter, error: str) -> None:
    try:
        writer.write(json.dumps({"ok": False, "error": error}).encode() + b"\n")
    except (ConnectionError, RuntimeError):
        pass


async def _answer(daemon, line: bytes) -> dict:
    from l4lb.daemon import DaemonError, NotReady  # noqa: PLC0415 - daemon imports us lazily
    from l4lb.dataplane.tables import TablesError  # noqa: PLC0415

    try:
        req = json.loads(line)
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str) or \
                not isinstance(req.get("args", {}), dict):
            raise ApiError("request must be {\"cmd\": str, \"args\": {}}")
        result = await handle(daemon, req["cmd"], req.get("args", {}))
        return {"ok": True, "result": result}
    except (ApiError, ConfigError, NotReady, json.JSONDecodeError, UnicodeDecodeError) as e:
        return {"ok": False, "error": str(e)}
    except (DaemonError, TablesError) as e:  # already logged where it happened
        return {"ok": False, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - the service stays up, the caller learns why
        log.exception("API request failed")
        return {"ok": False, "error": f"internal error: {e}"}


ENCODE_SLICE = 2000  # rows per json.dumps call: a few ms each


async def encode(resp: dict) -> bytes:
    """The answer as JSON. A long list (conns) is encoded in slices with the loop let in
    between: json's C encoder holds the GIL for a whole call, a thread would not help."""
    rows = resp.get("result")
    if not isinstance(rows, list) or len(rows) <= ENCODE_SLICE:
        return json.dumps(resp, default=str).encode()
    parts = [b'{"ok": true, "result": [']
    for i in range(0, len(rows), ENCODE_SLICE):
        if i:
            parts.append(b", ")
        parts.append(json.dumps(rows[i:i + ENCODE_SLICE], default=str)[1:-1].encode())
        await asyncio.sleep(0)
    parts.append(b"]}")
    return b"".join(parts)


async def _serve_conn(daemon, clients: _Clients, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, read_timeout: float):
    if not clients.admit(writer):
        _say(writer, f"busy: {clients.cap} API requests are being served; retry in a moment")
        writer.close()
        return
    try:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), read_timeout)
        except asyncio.TimeoutError:
            clients.timed_out += 1
            _say(writer, f"timeout: no request line within {read_timeout:g} s")
            return
        except asyncio.LimitOverrunError:
            _say(writer, f"request: longer than {MAX_REQUEST} bytes")
            return
        clients.working(writer)
        resp = await _answer(daemon, line)
        writer.write(await encode(resp))
        writer.write(b"\n")  # apart: no second copy of a 100 MB answer
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        clients.leave(writer)
        writer.close()


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse anything else at `path`."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else \
            "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a regular file" \
            if stat.S_ISREG(st.st_mode) else "not a socket"
        raise RuntimeError(f"node.api_socket: {path} is {kind}, not a socket; l4lb will not "
                           "remove it: move it away or set another node.api_socket")
    # Refuse to steal the socket of a live daemon.
    try:
        request(str(path), "status", timeout=1.0)
    except ApiError as e:
        if not str(e).startswith("starting:"):
            path.unlink(missing_ok=True)  # answered oddly: not a live l4lb
            return
    except (ConnectionError, FileNotFoundError, OSError, ValueError):
        path.unlink(missing_ok=True)
        return
    raise RuntimeError(f"another l4lb daemon answers on {path}; stop it first (`l4lb stop`)")


async def serve(daemon, read_timeout: float = READ_TIMEOUT, max_clients: int = MAX_CLIENTS):
    path = Path(daemon.cfg.node.api_socket)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _clear_stale_socket(path)
    clients = _Clients(max_clients)
    old = os.umask(0o177)  # the socket is born 0600: root only
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _serve_conn(daemon, clients, r, w, read_timeout),
            path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.clients = clients  # counters, for tests and status
    return server


def request(sock_path: str, cmd: str, timeout: float = 30.0, **args):
    """Blocking client call used by the CLI; raises ApiError with the daemon's message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                s.connect(sock_path)
                break
            except BlockingIOError:  # the listen backlog is full: the daemon is busy
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{sock_path}: the daemon accepts no connection") \
                        from None
                time.sleep(0.01)
        try:
            s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before reading (busy): what it said is below
        buf = bytearray()  # a conns answer can be 100 MB: no quadratic bytes +=
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ApiError("the daemon closed the connection without answering")
    try:
        resp = json.loads(buf)
    except ValueError:
        raise ApiError("the daemon's answer is cut short or not JSON") from None
    if not resp.get("ok"):
        raise ApiError(resp.get("error", "unknown error"))
    return resp["result"]
