"""The API server without BPF: requests before the data plane is ready, the read
timeout, the cap on clients, and what may sit at the socket path."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import stat
import threading

import pytest

from l4lb import api
from l4lb.config import config_from_dict
from l4lb.daemon import Daemon, NotReady, private_dir
from l4lb.dataplane.loader import BuildOptions
from l4lb.dataplane.tables import RealState, VipState

STARTING = "starting: the XDP program is still compiling; retry in a few seconds"


def make_cfg(tmp_path):
    return config_from_dict({
        "node": {"name": "lbt", "interfaces": ["lo"], "api_socket": str(tmp_path / "api.sock")},
        "vip": [{"address": "10.99.0.100", "port": 80, "real": [{"address": "10.99.0.31"}]}],
    })


class Blocking(Daemon):
    """A Daemon whose changes wait for `release` (to hold clients busy)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tables = object()  # "loaded": status is not called in these tests
        self.ready = True
        self.release = asyncio.Event()

    async def change(self, mutate):
        await self.release.wait()
        return self.cfg


class FakeTables:
    """The bookkeeping of ServiceTables without maps: what apply() writes, with a yield
    to the loop inside each write so that interleaving would show."""

    def __init__(self):
        self.opts = BuildOptions()
        self.vips: dict[str, VipState] = {}
        self.reals: dict[str, dict[str, int]] = {}  # what was written, per VIP key
        self.next_id = 1

    def upsert_vip(self, address, port, proto, **kw):
        vs = VipState(str(address), port, proto, len(self.vips))
        self.vips.setdefault(vs.key, vs)

    def set_reals(self, key, reals):
        vs = self.vips[key]
        for addr, _mac, w in reals:
            if str(addr) not in vs.reals:
                vs.reals[str(addr)] = RealState(str(addr), self.next_id, _mac, w)
                self.next_id += 1
        self.reals[key] = {str(a): w for a, _m, w in reals}

    def delete_vip(self, key):
        del self.vips[key]

    def set_down(self, key, address, down):
        return False


class NoHealth:
    checks: dict = {}

    def sync(self, wanted, start_down=frozenset()):
        pass

    def is_up(self, vip, real):
        return True

    def stop(self):
        pass


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def read_all(s: socket.socket) -> bytes:
    buf = b""
    while chunk := s.recv(4096):
        buf += chunk
    return buf


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


def test_requests_while_compiling_get_a_clear_answer(tmp_path):
    d = Daemon(make_cfg(tmp_path))  # tables None: the program is still compiling
    with pytest.raises(NotReady, match="^starting: "):
        d.status()
    with pytest.raises(NotReady):
        d.stats()

    async def main():
        server = await api.serve(d)
        try:
            path = d.cfg.node.api_socket
            for cmd, args in [("status", {}), ("stats", {}), ("conns", {"limit": 1}),
                              ("real_add", {"vip": "10.99.0.100:80/tcp",
                                            "address": "10.99.0.32"}),
                              ("reload", {})]:
                with pytest.raises(api.ApiError) as info:
                    await asyncio.to_thread(functools.partial(api.request, path, cmd, timeout=5, **args))
                assert str(info.value) == STARTING, cmd
        finally:
            server.close()

    asyncio.run(main())
    assert d.cfg.vips[0].reals[0].address.exploded == "10.99.0.31"  # nothing changed


def test_cli_prints_starting_and_fails(tmp_path):
    from typer.testing import CliRunner

    from l4lb.cli import app

    d = Daemon(make_cfg(tmp_path))

    async def main():
        server = await api.serve(d)
        try:
            return await in_thread(lambda: CliRunner().invoke(
                app, ["status", "--socket", d.cfg.node.api_socket]))
        finally:
            server.close()

    r = asyncio.run(main())
    assert r.exit_code == 1
    assert f"l4lb: error: {STARTING}" in r.output


def test_idle_client_is_timed_out(tmp_path):
    d = Blocking(make_cfg(tmp_path))

    async def main():
        server = await api.serve(d, read_timeout=0.3)
        try:
            s = await in_thread(connect, d.cfg.node.api_socket)
            s.sendall(b'{"cmd": "sta')  # never finishes the line
            got = await in_thread(read_all, s)
            s.close()
            return got, server.clients.timed_out
        finally:
            server.close()

    got, timed_out = asyncio.run(main())
    assert json.loads(got) == {"ok": False, "error": "timeout: no request line within 0.3 s"}
    assert timed_out == 1


def test_client_cap_pushes_out_idle_clients_and_refuses_when_all_are_busy(tmp_path):
    d = Blocking(make_cfg(tmp_path))
    path = d.cfg.node.api_socket
    cap = 8

    async def main():
        server = await api.serve(d, read_timeout=30, max_clients=cap)
        try:
            idle = [await in_thread(connect, path) for _ in range(cap)]
            # A new client is served although `cap` idle ones are connected: the oldest
            # idle one makes room and is told why.
            d.release.set()
            r = await in_thread(lambda: api.request(path, "vip_del", timeout=5,
                                                    vip="10.99.0.100:80/tcp"))
            assert r == {"vips": ["10.99.0.100:80/tcp"]}
            assert json.loads(await in_thread(read_all, idle[0]))["error"] == \
                f"closed: more than {cap} API clients; this one sent no request"
            # `cap` clients busy with requests: the next one is refused, not queued forever
            d.release.clear()
            busy = []
            for _ in range(cap):
                s = await in_thread(connect, path)
                s.sendall(json.dumps({"cmd": "vip_del", "args": {
                    "vip": "10.99.0.100:80/tcp"}}).encode() + b"\n")
                busy.append(s)
            for _ in range(100):
                if len(server.clients.busy) == cap:
                    break
                await asyncio.sleep(0.02)
            assert len(server.clients.busy) == cap
            with pytest.raises(api.ApiError, match=f"^busy: {cap} API requests"):
                await in_thread(lambda: api.request(path, "status", timeout=5))
            d.release.set()
            for s in busy:
                assert json.loads(await in_thread(read_all, s))["ok"] is True
            for s in idle + busy:
                s.close()
            return server.clients
        finally:
            server.close()

    clients = asyncio.run(main())
    assert clients.evicted == cap and clients.refused == 1


def test_regular_file_at_the_socket_path_is_kept(tmp_path):
    d = Daemon(make_cfg(tmp_path))
    p = tmp_path / "api.sock"
    p.write_text("precious\n")

    async def main():
        await api.serve(d)

    with pytest.raises(RuntimeError) as info:
        asyncio.run(main())
    assert str(info.value).startswith(f"node.api_socket: {p} is a regular file, not a socket; "
                                      "l4lb will not remove it")
    assert p.read_text() == "precious\n"
    p.unlink()
    p.mkdir()
    with pytest.raises(RuntimeError, match="is a directory, not a socket"):
        asyncio.run(main())
    assert p.is_dir()


def test_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path):
    d = Daemon(make_cfg(tmp_path))
    path = d.cfg.node.api_socket
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # a socket file nobody listens on: what a kill -9 leaves

    async def main():
        server = await api.serve(d)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            # a second daemon with the same socket refuses to start (even while the
            # first one is still compiling and answers "starting")
            with pytest.raises(RuntimeError, match="another l4lb daemon answers"):
                await in_thread(lambda: asyncio.run(api.serve(Daemon(make_cfg(tmp_path)))))
        finally:
            server.close()

    asyncio.run(main())


def test_private_dir_is_0700_also_when_it_existed(tmp_path):
    p = tmp_path / "run" / "l4lb"
    p.mkdir(parents=True, mode=0o755)
    os.chmod(p, 0o755)
    private_dir(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o700
    q = p / "node"
    private_dir(q)
    assert stat.S_IMODE(q.stat().st_mode) == 0o700
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(Exception, match="is not a directory"):
        private_dir(f)


def test_concurrent_changes_are_serialized_and_none_is_lost(tmp_path, monkeypatch):
    """Daemon.change() against fake tables: 5 x 20 concurrent real adds and drains from
    threads while ARP takes its time and one real never answers; every acknowledged
    change is in the final config and in the tables."""
    from l4lb import netutil

    silent = "10.99.1.250"

    def resolve_mac(addr, timeout):
        import time

        time.sleep(timeout if addr == silent else 0.02)  # ARP is slow: changes overlap
        return None if addr == silent else "02:00:00:00:00:02"

    monkeypatch.setattr(netutil, "resolve_mac", resolve_mac)
    d = Daemon(make_cfg(tmp_path))
    d.health = NoHealth()  # no probes leave this test
    d.tables = FakeTables()
    d.ready = True
    vip = "10.99.0.100:80/tcp"

    async def main():
        await d._resolve_macs(d._unknown_macs(d.cfg))
        await d.apply(d.cfg, initial=True)
        server = await api.serve(d)
        resolver = asyncio.create_task(d._resolver_loop())  # retries the silent one
        path = d.cfg.node.api_socket
        acked: list[tuple] = []
        lock = threading.Lock()

        def client(c: int):
            if c == 0:
                api.request(path, "real_add", timeout=30, vip=vip, address=silent)
                with lock:
                    acked.append((silent, 100))
            for i in range(20):
                addr = f"10.99.1.{10 + c * 20 + i}"
                api.request(path, "real_add", timeout=30, vip=vip, address=addr, weight=1 + i)
                with lock:
                    acked.append((addr, 1 + i))
                if i % 4 == 3:
                    api.request(path, "real_drain", timeout=30, vip=vip, address=addr)
                    with lock:
                        acked.append((addr, 0))
        # Plain threads: the loop's default pool stays the daemon's own.
        threads = [threading.Thread(target=client, args=(c,)) for c in range(5)]
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5)  # one more resolver round, with the silent real
        finally:
            resolver.cancel()
            server.close()
        return acked

    acked = asyncio.run(main())
    final = {str(r.address): r.weight for r in d.cfg.vips[0].reals}
    want = dict(acked)  # the last acknowledged weight of each address
    assert len(want) == 101
    for addr, w in want.items():
        assert final[addr] == w, addr
    # the tables got what the config says (the silent real without a MAC)
    assert d.tables.reals[vip] == final
    assert d.tables.vips[vip].reals[silent].mac == "00:00:00:00:00:00"
    assert d.tables.vips[vip].reals["10.99.1.10"].mac == "02:00:00:00:00:02"


def _daemon_with_fake_tables(tmp_path, opts=None):
    d = Daemon(make_cfg(tmp_path))
    d.health = NoHealth()
    d.tables = FakeTables()
    if opts is not None:
        d.tables.opts = opts
    d.ready = True
    d.macs = {f"10.99.0.{i}": "02:00:00:00:00:01" for i in range(1, 255)}
    return d


def test_real_ids_held_by_deleted_reals_are_counted_before_any_write(tmp_path):
    d = _daemon_with_fake_tables(tmp_path, BuildOptions(max_reals=6))  # ids 1..5
    vip = "10.99.0.100:80/tcp"

    def add(addr):
        return lambda data: data["vip"][0]["real"].append({"address": addr})

    async def main():
        await d.apply(d.cfg, initial=True)
        for a in ("10.99.0.32", "10.99.0.33", "10.99.0.34", "10.99.0.35"):
            await d.change(add(a))
        # two reals deleted while flows may still use them: their ids stay taken
        for a in ("10.99.0.34", "10.99.0.35"):
            vs = d.tables.vips[vip]
            vs.retired[a] = vs.reals.pop(a)
            await d.change(lambda data, a=a: data["vip"][0]["real"].remove(
                next(r for r in data["vip"][0]["real"] if r["address"] == a)))
        before = (d.cfg, dict(d.tables.reals))
        with pytest.raises(ConfigError) as info:
            await d.change(add("10.99.0.36"))  # 4 reals fit MAX_REALS, not 5 held ids + 1
        assert str(info.value) == (
            "real ids: this change needs 1 new real ids but 0 of 5 (MAX_REALS - 1) are free; "
            "ids of deleted reals are freed once no connection names them (checked every 30 s)")
        assert (d.cfg, dict(d.tables.reals)) == before
        await d.change(add("10.99.0.34"))  # a retired real comes back with its own id
        assert set(d.tables.vips[vip].reals) >= {"10.99.0.34"}

    from l4lb.config import ConfigError
    asyncio.run(main())


def test_a_failing_map_write_restores_the_previous_config(tmp_path):
    from l4lb.daemon import DaemonError

    d = _daemon_with_fake_tables(tmp_path)
    vip = "10.99.0.100:80/tcp"
    real_set = d.tables.set_reals
    calls = []

    def failing(key, reals):
        calls.append([str(a) for a, _m, _w in reals])
        if any(str(a) == "10.99.0.99" for a, _m, _w in reals):
            raise OSError(28, "No space left on device")
        return real_set(key, reals)

    async def main():
        await d.apply(d.cfg, initial=True)
        d.tables.set_reals = failing
        with pytest.raises(DaemonError, match="writing the maps failed: .*No space left"):
            await d.change(lambda data: data["vip"][0]["real"].append(
                {"address": "10.99.0.99"}))

    asyncio.run(main())
    assert [str(r.address) for r in d.cfg.vips[0].reals] == ["10.99.0.31"]
    assert calls == [["10.99.0.31", "10.99.0.99"], ["10.99.0.31"]]  # tried, then restored
    assert d.tables.reals[vip] == {"10.99.0.31": 100}


def test_oversized_request_gets_an_answer_naming_the_limit(tmp_path):
    d = Blocking(make_cfg(tmp_path))

    def send_big(path):
        s = connect(path)
        try:
            s.sendall(b"x" * (api.MAX_REQUEST + 4096))  # no newline
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before taking it all
        got = read_all(s)
        s.close()
        return got

    async def main():
        server = await api.serve(d)
        try:
            return await in_thread(send_big, d.cfg.node.api_socket)
        finally:
            server.close()

    assert json.loads(asyncio.run(main())) == {
        "ok": False, "error": f"request: longer than {api.MAX_REQUEST} bytes"}


def test_long_answers_are_encoded_in_slices_to_the_same_json():
    rows = [{"client": f"10.0.{i // 250}.{i % 250}", "cport": i, "real": "10.99.0.31"}
            for i in range(3 * api.ENCODE_SLICE + 7)]
    for result in (rows, rows[:api.ENCODE_SLICE], rows[:api.ENCODE_SLICE + 1], [], {"a": 1}):
        resp = {"ok": True, "result": result}
        assert json.loads(asyncio.run(api.encode(resp))) == resp
