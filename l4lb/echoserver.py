"""A tiny identify/echo server for the lab: tells the client which real answered.

TCP: on connect sends "<name>\\n", then echoes every line back prefixed with the
name, so a long-lived connection can check on each exchange that it still talks
to the same real. UDP: answers every datagram with "<name> <datagram>".
Listens on both IPv4 and IPv6 (a dual-stack socket on "::").
"""

from __future__ import annotations

import argparse
import asyncio
import socket


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

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport):  # type: ignore[override]
            self.transport = transport

        def datagram_received(self, data, addr):  # type: ignore[override]
            self.transport.sendto(tag + b" " + data, addr)

    usock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    usock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    usock.bind(("::", port))
    await asyncio.get_running_loop().create_datagram_endpoint(Udp, sock=usock)
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
