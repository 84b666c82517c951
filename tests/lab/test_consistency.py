"""Control-plane consistency against a lab daemon: concurrent runtime changes lose
nothing, a change that does not fit is refused whole, the API copes with idle
clients, and kill -9 in the middle of changes leaves status, tables.json and the
maps agreeing while held connections carry on."""

from __future__ import annotations

import ctypes as ct
import json
import os
import random
import re
import resource
import signal
import socket
import stat
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from l4lb import maglev
from l4lb.api import ApiError, request
from l4lb.dataplane import bpfsys
from l4lb.dataplane import maps as M
from l4lb.lab import Lab, wait_for

PORT = 9000
MAIN = f"10.99.0.100:{PORT}/tcp"
TPORTS = list(range(9100, 9110))  # ten more VIPs on the same address: two per client
TVIPS = [f"10.99.0.100:{p}/tcp" for p in TPORTS]
REALS = ["10.99.0.31", "10.99.0.32", "10.99.0.33", "10.99.0.34"]
SILENT = "10.99.0.77"  # in the lab subnet, but no node: never answers ARP
RING = 4093
NO_MAC = "00:00:00:00:00:00"


def config(lab):
    vips = [{"address": "10.99.0.100", "port": PORT,
             "real": [{"address": a} for a in REALS[:3]]}]
    # Health checks of the extra VIPs go to the echo servers on PORT.
    vips += [{"address": "10.99.0.100", "port": p, "ring_size": RING,
              "healthcheck": {"port": PORT}} for p in TPORTS]
    return lab.balancer_config("lb1", vips, healthcheck={
        "type": "tcp", "interval_s": 0.5, "timeout_s": 0.5, "rise": 1, "fall": 3})


@pytest.fixture(scope="module")
def lab():
    with Lab("tcons", clients=1, balancers=1, reals=4) as lab:
        for r in lab.by_role("real"):
            lab.start_echo(r.name, PORT)
        # A 0755 state dir, as older versions left it: the daemon makes it 0700.
        Path("/run/l4lb").mkdir(exist_ok=True)
        os.chmod("/run/l4lb", 0o755)
        node_dir = Path("/run/l4lb") / lab.l4lb_name("lb1")
        node_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(node_dir, 0o755)
        lab.daemon = lab.start_l4lb("lb1", config(lab))
        lab.sock = lab.api_socket("lb1")
        yield lab


# ------------------------------------------------------------------ the pinned maps
class PinnedMaps:
    """The daemon's maps as the XDP program sees them, opened by pin path."""

    def __init__(self, pin_dir: str):
        self.ring_max = int(re.search(r"-r(\d+)-", pin_dir).group(1))
        self.fds = {}
        for name in ("vips", "rings", "reals", "conns"):
            self.fds[name] = bpfsys.obj_get(f"{pin_dir}/{name}")

    def close(self):
        for fd in self.fds.values():
            os.close(fd)

    def _get(self, name, key, val) -> bool:
        attr = bpfsys.ElemAttr(map_fd=self.fds[name], key=ct.addressof(key),
                               value=ct.addressof(val))
        return bpfsys.bpf(bpfsys.BPF_MAP_LOOKUP_ELEM, attr) == 0

    def vip(self, key: str) -> M.VipMeta | None:
        addr, port, proto = re.fullmatch(r"\[?(.+?)\]?:(\d+)/(\w+)", key).groups()
        meta = M.VipMeta()
        return meta if self._get("vips", M.vip_key(addr, int(port), proto), meta) else None

    def ring(self, meta: M.VipMeta) -> list[int]:
        base = meta.ring_slot * self.ring_max
        k, v = ct.c_uint32(), ct.c_uint32()
        out = []
        for i in range(meta.ring_size):
            k.value = base + i
            assert self._get("rings", k, v)
            out.append(v.value)
        return out

    def real(self, rid: int) -> M.RealDef:
        r = M.RealDef()
        assert self._get("reals", ct.c_uint32(rid), r)
        return r

    def add_conns(self, entries: list[tuple]) -> None:
        """Write conn entries (client, cport, vip, vport, real id, vip id), TCP."""
        from l4lb.dataplane.tables import CONN_KEY, CONN_VAL

        keys = b"".join(CONN_KEY.pack(socket.inet_aton(c) + bytes(12), socket.inet_aton(v) +
                                      bytes(12), cp, vp, socket.IPPROTO_TCP, M.FAMILY_V4)
                        for c, cp, v, vp, _, _ in entries)
        vals = b"".join(CONN_VAL.pack(rid, vid, 0) for *_, rid, vid in entries)
        bpfsys.update_batch(self.fds["conns"], keys, vals, len(entries))

    def programmed_reals(self, max_reals: int = M.DEFAULT_MAX_REALS) -> dict[int, str]:
        """id -> address of every id the reals map holds (family 0 = unused)."""
        out = {}
        for rid in range(1, max_reals):
            r = self.real(rid)
            if r.family:
                out[rid] = str(M.addr_from16(r.addr, r.family))
        return out


def status(lab):
    return request(lab.sock, "status", timeout=20)


def tables_json(lab) -> dict:
    return json.loads((Path("/run/l4lb") / lab.l4lb_name("lb1") / "tables.json").read_text())


def _vkey(v: dict) -> str:
    a = v["address"]
    return f"[{a}]:{v['port']}/{v['proto']}" if ":" in a else f"{a}:{v['port']}/{v['proto']}"


def check_agree(lab, st: dict | None = None) -> dict:
    """status, tables.json and the maps say the same; raises AssertionError where not."""
    st = st or status(lab)
    tj = tables_json(lab)
    maps = PinnedMaps(st["pin_dir"])
    try:
        tvips = {_vkey(v): v for v in tj["vips"]}
        assert set(tvips) == {v["vip"] for v in st["vips"]}, "VIPs of tables.json vs status"
        known: dict[int, str] = {}
        for v in st["vips"]:
            t = tvips[v["vip"]]
            meta = maps.vip(v["vip"])
            assert meta is not None, f"{v['vip']}: not in the vips map"
            assert (meta.vip_id, meta.ring_size) == (t["vip_id"], v["ring_size"]), v["vip"]
            if "slot" in t:
                assert meta.ring_slot == 2 * t["vip_id"] + t["slot"], \
                    f"{v['vip']}: live ring slot {meta.ring_slot}, tables.json says {t}"
            ids = {r["address"]: r["id"] for r in v["reals"]}
            assert ids == {r["address"]: r["real_id"] for r in t["reals"]}, v["vip"]
            for r in [*t["reals"], *t.get("retired", [])]:
                assert r["real_id"] not in known, f"real id {r['real_id']} used twice"
                known[r["real_id"]] = r["address"]
            live = []
            for r in v["reals"]:
                down = not r["up"] or r["mac"] == NO_MAC
                d = maps.real(r["id"])
                assert str(M.addr_from16(d.addr, d.family)) == r["address"]
                assert bool(d.flags & M.REAL_F_DOWN) == down, (v["vip"], r)
                if not down:
                    live.append(maglev.Backend(r["id"], r["address"], r["weight"]))
            want = list(maglev.build_ring(live, v["ring_size"]))
            got = maps.ring(meta)
            assert got == want, f"{v['vip']}: ring in the map differs from the config's at " \
                f"{sum(a != b for a, b in zip(got, want, strict=True))} of {len(want)} entries"
        # Every id the map programs is one tables.json holds for that address (else a
        # restart could hand it to another real, and move that real's flows). The other
        # way round only a retired id may be missing: reserved, never written (a kill
        # between saving and writing it), or already unused.
        programmed = maps.programmed_reals()
        assert programmed.items() <= known.items(), \
            f"reals map ids unknown to tables.json: {programmed.items() - known.items()}"
        live = {r["id"] for v in st["vips"] for r in v["reals"]}
        assert live <= programmed.keys()
    finally:
        maps.close()
    return st


def settled_agree(lab, timeout: float = 15.0) -> dict:
    """check_agree once health states stop moving (a probe may flip one between the
    status read and the map read)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check_agree(lab)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def reals_of(st: dict, vip: str) -> dict[str, dict]:
    return {r["address"]: r for v in st["vips"] if v["vip"] == vip for r in v["reals"]}


# ------------------------------------------------------------------------- tests
def test_state_dirs_are_private(lab):
    for d in (Path("/run/l4lb"), Path("/run/l4lb") / lab.l4lb_name("lb1")):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(os.stat(lab.sock).st_mode) == 0o600


def test_concurrent_changes_lose_nothing(lab):
    """5 clients x 20 real add / weight / drain calls at once, plus a real that never
    answers ARP: every acknowledged change is in the final config and in the maps."""
    acked: dict[tuple[str, str], int] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def client(c: int):
        rnd = random.Random(c)
        mine = [(v, a) for v in TVIPS[2 * c:2 * c + 2] for a in REALS]
        ops = [("real_add", v, a, rnd.randint(1, 500)) for v, a in mine]
        if c == 0:
            ops.insert(3, ("real_add", TVIPS[0], SILENT, 100))
        while len(ops) < 20 + (c == 0):
            v, a = rnd.choice(mine)
            ops.append(rnd.choice([("real_weight", v, a, rnd.randint(1, 500)),
                                   ("real_drain", v, a, 0)]))
        for cmd, v, a, w in ops:
            args = {"weight": w} if cmd != "real_drain" else {}
            try:
                request(lab.sock, cmd, timeout=30, vip=v, address=a, **args)
            except (ApiError, OSError) as e:
                errors.append(f"{cmd} {v} {a}: {e}")
                continue
            with lock:
                acked[(v, a)] = w

    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(5)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        took = time.monotonic() - t0
        assert not errors, errors
        assert len(acked) == 41
        st = status(lab)
        for (v, a), w in acked.items():
            assert reals_of(st, v)[a]["weight"] == w, (v, a)
        assert reals_of(st, TVIPS[0])[SILENT]["mac"] == NO_MAC
        # The resolver loop retries the silent real (and applies the config as it is then):
        # a few rounds later nothing has been reverted.
        time.sleep(5)
        wait_for(lambda: all(r["up"] for v in TVIPS for a, r in reals_of(status(lab), v).items()
                             if a != SILENT), 15, what="the added reals pass their checks")
        st = settled_agree(lab)
        for (v, a), w in acked.items():
            assert reals_of(st, v)[a]["weight"] == w, (v, a)
        print(f"100 concurrent changes + 1 silent real in {took:.1f} s")
    finally:
        lab.l4lb("lb1", ["reload"])  # back to the file: the extra VIPs without reals


def _dp_state(lab) -> tuple:
    """What the data plane and status say about every VIP (for before/after)."""
    st = check_agree(lab)
    maps = PinnedMaps(st["pin_dir"])
    try:
        metas = {v["vip"]: (maps.vip(v["vip"]).vip_id, maps.vip(v["vip"]).ring_slot)
                 for v in st["vips"]}
    finally:
        maps.close()
    return ([(v["vip"], v["ring_size"], [(r["address"], r["weight"], r["id"])
                                         for r in v["reals"]]) for v in st["vips"]], metas)


def test_changes_that_do_not_fit_are_refused_whole(lab):
    added = []
    try:
        # ring_size above what the running maps hold (they were built for 65537)
        before = _dp_state(lab)
        with pytest.raises(ApiError) as info:
            request(lab.sock, "vip_add", address="10.99.0.100", port=9200, ring_size=131071)
        assert str(info.value).startswith(
            "vip[11].ring_size: 131071 is above the compiled maximum 65537 of the running "
            "data plane (restart with this ring_size"), info.value
        r = lab.l4lb("lb1", ["vip", "add", "10.99.0.100", "9200", "--ring-size", "131071"],
                     check=False)
        assert r.returncode == 1 and "is above the compiled maximum 65537" in r.stderr
        assert _dp_state(lab) == before
        # the same through a reload of an edited file: refused, nothing applied
        cfg = config(lab)
        cfg["vip"][0]["ring_size"] = 131071
        cfg["vip"][1]["real"] = [{"address": REALS[3]}]
        lab.write_config("lb1", cfg)
        r = lab.l4lb("lb1", ["reload"], check=False)
        assert r.returncode == 1 and "vip[0].ring_size: 131071 is above the compiled maximum " \
            "65537" in r.stderr, r.stderr
        lab.daemon.proc.send_signal(signal.SIGHUP)  # the same file by SIGHUP: logged, refused
        wait_for(lambda: "reload refused, nothing applied" in lab.daemon.output(), 10,
                 what="SIGHUP refusal logged")
        lab.write_config("lb1", config(lab))
        assert _dp_state(lab) == before
        # VIPs up to the compiled maximum of 64, then the 65th is refused
        for port in range(9300, 9300 + 64 - 11):
            request(lab.sock, "vip_add", address="10.99.0.100", port=port, ring_size=7)
            added.append(f"10.99.0.100:{port}/tcp")
        before = _dp_state(lab)
        with pytest.raises(ApiError) as info:
            request(lab.sock, "vip_add", address="10.99.0.100", port=9400, ring_size=7)
        assert str(info.value) == "vip[64]: 65 VIPs are above the compiled maximum of 64 " \
            "VIPs (MAX_VIPS); delete a VIP first"
        assert _dp_state(lab) == before
        assert lab.daemon.alive
        assert "Traceback" not in lab.daemon.output()
    finally:
        for key in added:
            request(lab.sock, "vip_del", vip=key)
    assert len(status(lab)["vips"]) == 11


def test_conns_stops_at_limit_and_filters_off_the_loop(lab):
    """`conns` reads the conn table in a thread, in slices, and stops at --limit; status
    (the loop) answers meanwhile."""
    st = status(lab)
    maps = PinnedMaps(st["pin_dir"])
    main = {v["vip"]: v for v in st["vips"]}[MAIN]
    rid = main["reals"][0]["id"]
    vid = maps.vip(MAIN).vip_id
    other = maps.vip(TVIPS[1]).vip_id
    try:  # 60,000 flows from clients outside the lab's hosts; 1,000 of them for TVIPS[1]
        for b in range(6):
            maps.add_conns([(f"10.98.{b * 40 + i // 250}.{1 + i % 250}", 1024 + i % 50000,
                             "10.99.0.100", 9101 if (b == 0 and i < 1000) else PORT, rid,
                             other if (b == 0 and i < 1000) else vid) for i in range(10000)])
    finally:
        maps.close()
    one = lab.l4lb_json("lb1", ["conns", "--limit", "1"])
    assert len(one) == 1
    some = lab.l4lb_json("lb1", ["conns", "--vip", TVIPS[1], "--limit", "10"])
    assert len(some) == 10 and {r["vport"] for r in some} == {9101}
    assert {r["vip"] for r in some} == {"10.99.0.100"}
    # The whole table (60k rows) while status keeps answering from the loop.
    lat = []
    walker = threading.Thread(target=lambda: request(lab.sock, "conns", timeout=60,
                                                     limit=100000))
    t0 = time.monotonic()
    walker.start()
    while walker.is_alive():
        t1 = time.monotonic()
        status(lab)
        lat.append(time.monotonic() - t1)
    walk = time.monotonic() - t0
    walker.join()
    print(f"conns of 60k+ entries took {walk:.2f} s; {len(lat)} status calls meanwhile, "
          f"slowest {max(lat) * 1000:.0f} ms")
    assert len(lat) >= 2 and max(lat) < max(1.0, walk / 2)


def test_idle_api_clients_are_timed_out_and_new_ones_served(lab):
    pid = status(lab)["pid"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    base = len(os.listdir(f"/proc/{pid}/fd"))
    idle = []
    try:
        for _ in range(3000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(s)
            s.connect(lab.sock)  # blocking: waits while the listen backlog is full
        burst_fds = len(os.listdir(f"/proc/{pid}/fd"))
        time.sleep(1.0)  # the accept loop has caught up: the idle ones beyond the cap are gone
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        t0 = time.monotonic()
        st = request(lab.sock, "status", timeout=10)  # a new client is served at once
        served_in = time.monotonic() - t0
        assert st["pid"] == pid
        seen = Counter()
        for s in idle:
            s.settimeout(20)
            buf = b""
            while chunk := s.recv(4096):
                buf += chunk
            seen[json.loads(buf)["error"].split(":")[0] if buf else "eof"] += 1
        assert set(seen) <= {"closed", "timeout"} and sum(seen.values()) == 3000, seen
        assert seen["timeout"] >= 1  # the last ones were timed out, not pushed out
        assert fds - base <= 64 + 10, f"the daemon held {fds} fds ({base} before) with 3000 " \
            "clients connected"
        print(f"3000 idle clients: {dict(seen)}; daemon fds {base} before, {burst_fds} right "
              f"after the last connect, {fds} 1 s later; status served in "
              f"{served_in:.2f} s")
    finally:
        for s in idle:
            s.close()
    assert request(lab.sock, "status", timeout=10)["pid"] == pid


def test_a_regular_file_at_the_socket_path_is_kept(lab):
    path = lab.workdir / "not-a-socket"
    path.write_text("keep me\n")
    cfg = config(lab)
    cfg["node"]["name"] = lab.l4lb_name("lb9")
    cfg["node"]["api_socket"] = str(path)
    cfg["metrics"] = {"enabled": False}
    r = lab.run("lb1", [sys.executable, "-m", "l4lb.cli", "start", "-c",
                        str(lab.write_config("lb9", cfg))], check=False, timeout=60)
    assert r.returncode == 1
    assert f"node.api_socket: {path} is a regular file, not a socket; l4lb will not remove " \
        "it" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert path.read_text() == "keep me\n"
    assert lab.daemon.alive


def test_kill9_during_changes(lab):
    """kill -9 at random points of a burst of changes, restart: status, tables.json and
    the maps agree after each restart, and 30 held connections see no reset."""
    ready = lab.workdir / "kill-hold.json"
    holder = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "hold",
                                   f"10.99.0.100:{PORT}", "--conns", "30", "--every", "0.1",
                                   "--seconds", "150", "--ready-file", str(ready)])
    wait_for(ready.exists, 15, what="held connections")
    stop, pause = threading.Event(), threading.Event()
    busy = threading.Lock()
    done = Counter()

    def burst():
        rnd = random.Random(7)
        while not stop.is_set():
            if pause.is_set():
                time.sleep(0.02)
                continue
            v = rnd.choice([MAIN] + TVIPS)
            a = rnd.choice(REALS)
            cmd, args = rnd.choice([("real_add", {"weight": rnd.randint(1, 300)}),
                                    ("real_weight", {"weight": rnd.randint(1, 300)}),
                                    ("real_drain", {}), ("real_del", {})])
            if v == MAIN and a != REALS[3] and cmd in ("real_del", "real_drain"):
                cmd, args = "real_weight", {"weight": rnd.randint(1, 300)}  # keep real1-3
            with busy:
                failed = True
                try:
                    request(lab.sock, cmd, timeout=10, vip=v, address=a, **args)
                    done["ok"] += 1
                    failed = False
                except ApiError as e:  # refused (no such real...), or "starting"
                    failed = str(e).startswith("starting:")
                    done["starting" if failed else "refused"] += 1
                except OSError as e:
                    done[type(e).__name__] += 1
            if failed:  # down or starting: don't spin on the CPUs the compile needs
                time.sleep(0.2)

    t = threading.Thread(target=burst)
    t.start()
    rnd = random.Random(11)
    kills = 0
    t0 = time.monotonic()
    try:
        # Each restart compiles the XDP program (~2 s, 10 s on a loaded 2-core box): as many
        # kill points as fit in ~25 s, and at least 3 however loaded the box is.
        while kills < 20 and (time.monotonic() - t0 < 25 or
                              (kills < 3 and time.monotonic() - t0 < 150)):
            time.sleep(rnd.uniform(0.05, 1.0))
            lab.daemon.proc.kill()  # SIGKILL, wherever the change burst is
            lab.daemon.proc.wait(10)
            kills += 1
            lab.daemon = lab.start_l4lb("lb1", config(lab))
            pause.set()
            with busy:  # no change in flight while we compare
                settled_agree(lab)
            assert "starting with empty maps" not in lab.daemon.output()  # ids, conns kept
            pause.clear()
    finally:
        stop.set()
        t.join(30)
    holder.proc.send_signal(2)
    holder.proc.wait(30)
    out = json.loads(holder.output().strip().splitlines()[-1])
    print(f"{kills} kills in {time.monotonic() - t0:.0f} s; changes {dict(done)}; held "
          f"connections: alive {out['alive']}, errors {out['errors']}, moved {out['moved']}")
    assert kills >= 3, "the restarts are too slow to test enough kill points"
    assert done["ok"] >= 10 * kills
    assert out["alive"] == 30 and out["errors"] == 0 and out["moved"] == 0, out
