"""The local control API: JSON lines over a root-only unix socket.

Request:  {"cmd": "real_weight", "args": {"vip": "10.99.0.100:80/tcp", ...}}
Response: {"ok": true, "result": ...} or {"ok": false, "error": "what is wrong"}
Changes go through Daemon.change(): validated as a whole config, applied
atomically, or refused with nothing applied.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
from pathlib import Path

from l4lb.config import ConfigError

log = logging.getLogger("l4lb.api")
MAX_REQUEST = 1 << 20


class ApiError(Exception):
    pass


def _vip_index(data: dict, key: str) -> int:
    from l4lb.config import config_from_dict  # noqa: PLC0415
    cfg = config_from_dict(data, source="api")
    try:
        v = cfg.vip_by_key(key)
    except KeyError:
        raise ApiError(f"no VIP {key!r}; `l4lb status` lists them (form: 10.0.0.1:80/tcp, "
                       "[fd00::1]:80/tcp)") from None
    return list(cfg.vips).index(v)


def _real_index(vip: dict, address: str) -> int:
    try:
        want = ipaddress.ip_address(address)
    except ValueError:
        raise ApiError(f"address: {address!r} is not an IP address") from None
    for i, r in enumerate(vip.get("real", [])):
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
        if not isinstance(limit, int) or limit < 1:
            raise ApiError("limit: must be a positive integer")
        try:
            return daemon.conns(args.get("vip"), limit)
        except KeyError:
            raise ApiError(f"no VIP {args.get('vip')!r}") from None
    if cmd == "reload":
        return await daemon.reload()
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


async def _serve_conn(daemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        line = await reader.readuntil(b"\n")
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str) or \
                    not isinstance(req.get("args", {}), dict):
                raise ApiError("request must be {\"cmd\": str, \"args\": {}}")
            result = await handle(daemon, req["cmd"], req.get("args", {}))
            resp = {"ok": True, "result": result}
        except (ApiError, ConfigError, json.JSONDecodeError) as e:
            resp = {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - the service stays up, the caller learns why
            log.exception("API request failed")
            resp = {"ok": False, "error": f"internal error: {e}"}
        writer.write(json.dumps(resp, default=str).encode() + b"\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(daemon):
    path = Path(daemon.cfg.node.api_socket)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        # Refuse to steal the socket of a live daemon.
        try:
            request(str(path), "status", timeout=1.0)
            raise RuntimeError(f"another l4lb daemon answers on {path}; stop it first "
                               "(`l4lb stop`)")
        except (ConnectionError, FileNotFoundError, OSError, ApiError):
            path.unlink(missing_ok=True)
    old = os.umask(0o177)  # the socket is born 0600: root only
    try:
        server = await asyncio.start_unix_server(lambda r, w: _serve_conn(daemon, r, w),
                                                 path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def request(sock_path: str, cmd: str, timeout: float = 30.0, **args):
    """Blocking client call used by the CLI; raises ApiError with the daemon's message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ApiError("the daemon closed the connection without answering")
    resp = json.loads(buf)
    if not resp.get("ok"):
        raise ApiError(resp.get("error", "unknown error"))
    return resp["result"]
