"""A tiny identify/echo server for the lab: tells the client which real answered.

TCP: on connect sends "<name>\\n", then echoes every line back prefixed with the
name, so a long-lived connection can check on each exchange that it still talks
to the same real. UDP: answers every datagram with "<name> <datagram>", from the
address the datagram was sent to (the VIP, in DR and tunnel mode), as real UDP
services (DNS, QUIC) do: a client's connected socket accepts nothing else.
Listens on both IPv4 and IPv6.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux; Python 3.11 lacks the name
_IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex


def _udp_socket(family: int, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s.setblocking(False)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    return s


def _answer_udp(sock: socket.socket, tag: bytes) -> None:
    """Reply to each queued datagram from the address it was sent to."""
    while True:
        try:
            data, anc, _flags, addr = sock.recvmsg(65535, 256)
        except (BlockingIOError, InterruptedError):
            return
        reply_from = []
        for level, kind, raw in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                _ifindex, _spec, dst = _IN_PKTINFO.unpack_from(raw)
                reply_from = [(level, IP_PKTINFO, _IN_PKTINFO.pack(0, dst, b"\0" * 4))]
            elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                dst, _ifindex = _IN6_PKTINFO.unpack_from(raw)
                reply_from = [(level, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(dst, 0))]
        try:
            sock.sendmsg([tag + b" " + data], reply_from, 0, addr)
        except OSError:
            pass  # an unreachable client: drop, as a real service would


async def _serve(name: str, port: int) -> None:
    tag = name.encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(tag + b"\n")
            await writer.drain()
            while line := await reader.readline():
                writer.write(tag + b" " + line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(1024)
    server = await asyncio.start_server(handle, sock=sock)

    loop = asyncio.get_running_loop()
    for family in (socket.AF_INET, socket.AF_INET6):
        usock = _udp_socket(family, port)
        loop.add_reader(usock.fileno(), _answer_udp, usock, tag)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=9000)
    a = p.parse_args(argv)
    try:
        asyncio.run(_serve(a.name, a.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
