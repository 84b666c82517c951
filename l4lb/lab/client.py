"""Traffic for the lab, run inside a client namespace (`python -m l4lb.lab.client ...`).

spread: open N TCP connections to a VIP, one after another, and count which real
        (named by l4lb.lab.echoserver) answered each; JSON on stdout.
hold:   keep C long-lived connections open, each exchanging a line every
        --every seconds for --seconds; report per connection: the reals it saw,
        exchanges, errors (resets). JSON on stdout. SIGTERM/SIGINT ends early.
        --udp: C UDP flows instead, each a connected socket (so only replies from
        the VIP itself are seen, as a DNS or QUIC client would); a reply lost is
        counted, --max-lost replies lost in a row end the flow as an error.
probe:  start a TCP connect every --every seconds (not waiting for the last); a JSON line per
        answer with a timestamp and the real (used to measure outages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections import Counter


def _target(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


async def _hello(host: str, port: int, timeout: float):
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    name = (await asyncio.wait_for(r.readline(), timeout)).decode().strip()
    return r, w, name


def _answered(res: dict, name: str, last: float) -> float:
    """One reply from real `name`: a new real is a move; the longest gap so far. Returns now."""
    if not res["reals"] or name != res["reals"][-1]:
        res["reals"].append(name)
    res["exchanges"] += 1
    now = time.monotonic()
    res["max_gap_s"] = max(res["max_gap_s"], now - last)
    return now


async def _pause(stop: asyncio.Event, every: float) -> None:
    """`every` seconds, or less when told to stop."""
    try:
        await asyncio.wait_for(stop.wait(), every)
    except asyncio.TimeoutError:
        pass


async def spread(host: str, port: int, count: int, timeout: float, parallel: int) -> dict:
    names: Counter = Counter()
    errors: Counter = Counter()
    sem = asyncio.Semaphore(parallel)

    async def one():
        async with sem:
            try:
                r, w, name = await _hello(host, port, timeout)
                w.close()
                names[name or "?"] += 1
            except (OSError, asyncio.TimeoutError) as e:
                errors[type(e).__name__] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return {"ok": sum(names.values()), "errors": dict(errors), "reals": dict(names)}


async def hold(host: str, port: int, conns: int, every: float, seconds: float,
               timeout: float, ready_file: str | None, udp: bool = False,
               max_lost: int = 10) -> dict:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    results = []

    async def one(i: int):
        res = {"id": i, "reals": [], "exchanges": 0, "error": None, "max_gap_s": 0.0}
        results.append(res)
        try:
            r, w, name = await _hello(host, port, timeout)
            res["reals"].append(name)
            res["cport"] = w.get_extra_info("sockname")[1]
        except (OSError, asyncio.TimeoutError) as e:
            res["error"] = f"connect: {type(e).__name__}: {e}"
            return
        last = time.monotonic()
        n = 0
        try:
            while not stop.is_set():
                n += 1
                w.write(f"{i} {n}\n".encode())
                await w.drain()
                line = (await asyncio.wait_for(r.readline(), timeout)).decode()
                if not line:
                    raise ConnectionResetError("closed by peer")
                last = _answered(res, line.split(" ", 1)[0], last)
                await _pause(stop, every)
        except (OSError, asyncio.TimeoutError) as e:
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            w.close()

    async def one_udp(i: int):
        res = {"id": i, "reals": [], "exchanges": 0, "lost": 0, "error": None,
               "max_gap_s": 0.0}
        results.append(res)
        replies: asyncio.Queue = asyncio.Queue()

        class Flow(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):  # type: ignore[override]
                replies.put_nowait(data)

            def error_received(self, exc):  # type: ignore[override]
                replies.put_nowait(exc)  # ICMP unreachable: a reply lost

        try:
            transport, _ = await loop.create_datagram_endpoint(Flow, remote_addr=(host, port))
        except OSError as e:
            res["error"] = f"socket: {type(e).__name__}: {e}"
            return
        res["cport"] = transport.get_extra_info("sockname")[1]
        last = time.monotonic()
        n = in_a_row = 0
        try:
            while not stop.is_set():
                n += 1
                transport.sendto(f"{i} {n}\n".encode())
                try:
                    data = await asyncio.wait_for(replies.get(), min(timeout, 1.0))
                except asyncio.TimeoutError:
                    data = None
                if not isinstance(data, bytes):
                    res["lost"] += 1
                    in_a_row += 1
                    if in_a_row >= max_lost:
                        res["error"] = f"no reply to {in_a_row} datagrams in a row"
                        return
                    continue
                in_a_row = 0
                last = _answered(res, data.split(b" ", 1)[0].decode(), last)
                await _pause(stop, every)
        finally:
            transport.close()

    tasks = [asyncio.create_task((one_udp if udp else one)(i)) for i in range(conns)]
    await asyncio.sleep(0)
    if ready_file:
        # Ready once every connection has had its first answer.
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout + 5 and \
                sum(1 for r in results if r["reals"] or r["error"]) < conns:
            await asyncio.sleep(0.05)
        # Written aside and renamed: a reader polling for the file never sees it empty.
        with open(ready_file + ".tmp", "w") as f:
            json.dump({"connected": sum(1 for r in results if r["reals"])}, f)
        os.replace(ready_file + ".tmp", ready_file)
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        stop.set()
    await asyncio.gather(*tasks)
    errors = [r for r in results if r["error"]]
    return {"conns": conns, "alive": conns - len(errors), "errors": len(errors),
            "lost": sum(r.get("lost", 0) for r in results),
            "moved": sum(1 for r in results if len(r["reals"]) > 1),
            "max_gap_s": max((r["max_gap_s"] for r in results), default=0),
            "detail": results}


async def probe(host: str, port: int, every: float, seconds: float, timeout: float,
                failures: bool = False) -> None:
    """Start a connect every `every` seconds on a fixed schedule, without waiting for
    the previous one, so an outage is seen to the schedule's resolution rather than
    to the connect timeout's. A JSON line per answer; with `failures`, one per
    unanswered attempt too ({"t": ..., "ok": false})."""

    async def one(t: float) -> None:
        try:
            r, w, name = await _hello(host, port, timeout)
            w.close()
            print(json.dumps({"t": t, "ok": True, "real": name}), flush=True)
        except (OSError, asyncio.TimeoutError):
            if failures:
                print(json.dumps({"t": t, "ok": False}), flush=True)

    tasks = set()
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        task = asyncio.create_task(one(time.time()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        await asyncio.sleep(max(0.0, start + n * every - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spread")
    s.add_argument("target")
    s.add_argument("--count", type=int, default=300)
    s.add_argument("--parallel", type=int, default=20)
    s.add_argument("--timeout", type=float, default=5.0)
    h = sub.add_parser("hold")
    h.add_argument("target")
    h.add_argument("--conns", type=int, default=1)
    h.add_argument("--every", type=float, default=0.1)
    h.add_argument("--seconds", type=float, default=30.0)
    h.add_argument("--timeout", type=float, default=5.0)
    h.add_argument("--ready-file")
    h.add_argument("--udp", action="store_true", help="UDP flows on connected sockets")
    h.add_argument("--max-lost", type=int, default=10)
    pr = sub.add_parser("probe")
    pr.add_argument("target")
    pr.add_argument("--every", type=float, default=0.01)
    pr.add_argument("--seconds", type=float, default=10.0)
    pr.add_argument("--timeout", type=float, default=0.2)
    pr.add_argument("--failures", action="store_true", help="a line per unanswered attempt too")
    a = p.parse_args(argv)
    host, port = _target(a.target)
    socket.setdefaulttimeout(a.timeout)
    if a.cmd == "spread":
        out = asyncio.run(spread(host, port, a.count, a.timeout, a.parallel))
    elif a.cmd == "hold":
        out = asyncio.run(hold(host, port, a.conns, a.every, a.seconds, a.timeout,
                               a.ready_file, a.udp, a.max_lost))
    else:
        asyncio.run(probe(host, port, a.every, a.seconds, a.timeout, a.failures))
        return
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
