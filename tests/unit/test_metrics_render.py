"""The metrics exposition without BPF: the real Daemon, VrrpAgent and SyncAgent
objects over fake tables, rendered by L4lbCollector. Checks names against the
Prometheus conventions of README: Metrics and, when promtool is installed, runs
`promtool check metrics` on the output.

`fake_daemon()` and `family_names()` are also used by test_dashboard.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import struct
import subprocess
import threading
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from l4lb import metrics
from l4lb.config import Endpoint, MetricsConfig, config_from_dict
from l4lb.daemon import Daemon
from l4lb.dataplane import maps as M
from l4lb.dataplane.tables import CONN_VAL, RealState, VipState
from l4lb.health import CheckState, ProbeResult, RiseFall

VIPS = [
    {"address": "10.99.0.100", "port": 80, "protocol": "tcp",
     "real": [{"address": "10.99.0.31"}, {"address": "10.99.0.32", "weight": 0}]},
    {"address": "fd99::100", "port": 53, "protocol": "udp", "mode": "tun",
     "real": [{"address": "fd99::31"}]},
]


def _config():
    return config_from_dict({
        "node": {"name": "lbtest", "interfaces": ["lo"], "conn_table_size": 65536},
        "healthcheck": {"type": "tcp", "interval_s": 1.0, "timeout_s": 0.5},
        "vip": VIPS,
        "metrics": {"listen": "127.0.0.1:9541"},
        "vrrp": [{"name": "VI_1", "interface": "lo", "vrid": 51, "priority": 150,
                  "vips": ["10.99.0.100/24"]}],
        "sync": {"enabled": True, "listen": "127.0.0.1:9542", "peers": ["127.0.0.2:9542"],
                 "key": "k" * 32, "vrrp_instance": "VI_1"},
    })


class FakeTables:
    """What Daemon.stats()/status() and the collector read from ServiceTables."""

    def __init__(self, cfg, conns: list[tuple[int, int]]):
        self.opts = SimpleNamespace(pin_dir="/sys/fs/bpf/l4lb/lbtest")
        self.vips: dict[str, VipState] = {}
        self.counters: dict[tuple, dict] = {}
        rid = 1
        for vid, v in enumerate(cfg.vips):
            vs = VipState(address=str(v.address), port=v.port, proto=v.protocol, vip_id=vid,
                          mode=v.mode)
            for r in v.reals:
                vs.reals[str(r.address)] = RealState(str(r.address), rid, "02:00:00:00:00:01",
                                                     r.weight, down=False)
                self.counters[(vs.key, str(r.address))] = {
                    "packets": 10 * rid, "bytes": 1000 * rid, "new_flows": rid}
                rid += 1
            self.vips[vs.key] = vs
            self.counters[(vs.key,)] = {"packets": 100 + vid, "bytes": 10000 + vid,
                                        "new_flows": 5 + vid}
        self._conns = conns  # (real_id, vip_id) per entry

    def vip_counters(self, key):
        return self.counters[(key,)]

    def real_counters(self, key, address):
        return self.counters[(key, str(address))]

    def global_counters(self):
        return {r.name.lower(): 7 * (i + 1) for i, r in enumerate(M.StatReason)}

    def conn_count(self):
        return len(self._conns)

    def conn_batches(self, batch=1024):
        for i in range(0, len(self._conns), batch):
            chunk = self._conns[i:i + batch]
            vals = b"".join(CONN_VAL.pack(real, vip, 0) for real, vip in chunk)
            yield b"\0" * 40 * len(chunk), vals, len(chunk)


def fake_daemon(conns=((1, 0), (1, 0), (2, 0), (3, 1))):
    """A Daemon with everything a scrape reads: VIPs and reals with counters, health
    checks, one VRRP instance and a sync agent."""
    cfg = _config()
    d = Daemon(cfg)
    d.tables = FakeTables(cfg, list(conns))
    for v in cfg.vips:
        for i, r in enumerate(v.reals):
            st = CheckState(v.key, str(r.address), r.healthcheck, RiseFall(2, 2, up=i == 0))
            st.checks, st.failures = 12, 3 * i
            st.last = ProbeResult(i == 0, 0.0015, "" if i == 0 else "connection refused")
            d.health.checks[(v.key, str(r.address))] = st
    from l4lb.vrrp.agent import VrrpAgent  # noqa: PLC0415

    agent = VrrpAgent(cfg.vrrp[0], l2=object())  # l2: no AF_PACKET socket
    agent.state = "backup"
    agent.transitions["initialize->backup"] += 1
    agent.dropped["unknown_peer"] += 2
    d.vrrp.append(agent)
    from l4lb.sync.agent import SyncAgent  # noqa: PLC0415

    d.sync = SyncAgent(cfg.sync, cfg.node.name, d.tables, None, role="backup")
    return d


def parse(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def family_names(daemon=None) -> set[str]:
    """Every metric name a scrape can show, as a PromQL query names it (counters
    with _total, the build info as l4lb_build_info)."""
    text = metrics.render(daemon or fake_daemon()).decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


@pytest.fixture(scope="module")
def text():
    return metrics.render(fake_daemon()).decode()


def sample(fams, name, **labels):
    fam_name = name[:-len("_total")] if name.endswith("_total") else name
    for s in fams[fam_name].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


def test_issue_metrics_are_all_there(text):
    names = family_names()
    for want in [
        "l4lb_build_info",
        "l4lb_vip_packets_total", "l4lb_vip_bytes_total", "l4lb_vip_new_flows_total",
        "l4lb_real_packets_total", "l4lb_real_bytes_total", "l4lb_real_new_flows_total",
        "l4lb_real_up", "l4lb_real_weight",
        "l4lb_conn_table_entries", "l4lb_conn_table_misses_total",
        "l4lb_xdp_packets_total",
        "l4lb_vrrp_state", "l4lb_vrrp_transitions_total", "l4lb_vrrp_adverts_sent_total",
        "l4lb_vrrp_adverts_received_total", "l4lb_vrrp_adverts_rejected_total",
        "l4lb_sync_messages_sent_total", "l4lb_sync_messages_received_total",
        "l4lb_sync_entries_sent_total", "l4lb_sync_entries_received_total",
        "l4lb_sync_rejected_total", "l4lb_sync_lag_seconds",
        "l4lb_healthcheck_checks_total", "l4lb_healthcheck_failures_total",
        "l4lb_healthcheck_latency_seconds",
    ]:
        assert want in names, want


def test_conventions(text):
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    helps = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    assert len(re.findall(r"^# TYPE ", text, re.M)) == len(types), "duplicate families"
    assert set(types) == helps
    for name, typ in types.items():
        assert name.startswith("l4lb_"), name
        assert (typ == "counter") == name.endswith("_total"), (name, typ)
        assert not re.search(r"_(ms|milliseconds|kb|percent)(_|$)", name), name
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
        assert name in types, f"sample {name} has no TYPE line"
        # Prometheus's own target labels: ours would be renamed exported_<label>
        assert not re.search(r'[{,](instance|job)="', line), line
        if 'vip="' in line:
            vip = re.search(r'vip="([^"]*)"', line).group(1)
            assert re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+/(tcp|udp)", vip), vip


def test_values_come_from_the_daemon(text):
    fams = parse(text)
    v4, v6 = "10.99.0.100:80/tcp", "[fd99::100]:53/udp"
    assert sample(fams, "l4lb_vip_packets_total", vip=v4) == 100
    assert sample(fams, "l4lb_vip_bytes_total", vip=v6) == 10001
    assert sample(fams, "l4lb_real_packets_total", vip=v4, real="10.99.0.32") == 20
    assert sample(fams, "l4lb_real_new_flows_total", vip=v6, real="fd99::31") == 3
    assert sample(fams, "l4lb_real_up", vip=v4, real="10.99.0.31") == 1
    assert sample(fams, "l4lb_real_up", vip=v4, real="10.99.0.32") == 0
    assert sample(fams, "l4lb_real_weight", vip=v4, real="10.99.0.32") == 0
    assert sample(fams, "l4lb_real_in_ring", vip=v4, real="10.99.0.32") == 0
    assert sample(fams, "l4lb_healthcheck_failures_total", vip=v4, real="10.99.0.32") == 3
    assert sample(fams, "l4lb_healthcheck_last_success", vip=v4, real="10.99.0.32") == 0
    assert sample(fams, "l4lb_healthcheck_latency_seconds", vip=v4, real="10.99.0.31") == 0.0015
    # conn table: 4 entries, 3 of them for VIP id 0 (two on real 1)
    assert sample(fams, "l4lb_conn_table_entries") == 4
    assert sample(fams, "l4lb_vip_conn_table_entries", vip=v4) == 3
    assert sample(fams, "l4lb_real_conn_table_entries", vip=v4, real="10.99.0.31") == 2
    assert sample(fams, "l4lb_real_conn_table_entries", vip=v6, real="fd99::31") == 1
    assert sample(fams, "l4lb_conn_table_capacity") == 65536
    # global counters: StatReason i has 7 * (i + 1)
    r = M.StatReason
    assert sample(fams, "l4lb_xdp_packets_total", verdict="drop", reason="no_real") == \
        7 * (r.DROP_NO_REAL + 1)
    assert sample(fams, "l4lb_xdp_packets_total", verdict="pass", reason="non_vip") == \
        7 * (r.PASS_NON_VIP + 1)
    assert sample(fams, "l4lb_xdp_packets_total", verdict="tx", reason="dr") == 7 * (r.TX_DR + 1)
    assert sample(fams, "l4lb_conn_table_misses_total") == 7 * (r.CONN_MISS + 1)
    reasons = {s.labels["reason"] for s in fams["l4lb_xdp_packets"].samples}
    assert len(reasons) == sum(1 for x in r if x.name.split("_")[0] in ("PASS", "DROP", "TX"))
    # VRRP: one 1 among the states, fault included
    states = {s.labels["state"]: s.value for s in fams["l4lb_vrrp_state"].samples}
    assert states == {"initialize": 0, "backup": 1, "master": 0, "fault": 0}
    assert sample(fams, "l4lb_vrrp_transitions_total", vrrp_instance="VI_1") == 1
    assert sample(fams, "l4lb_vrrp_adverts_rejected_total", vrrp_instance="VI_1",
                  reason="unknown_peer") == 2
    build = fams["l4lb_build_info"].samples[0]
    assert build.name == "l4lb_build_info" and build.labels["node"] == "lbtest"


def test_before_the_data_plane_is_loaded_a_scrape_still_answers():
    d = fake_daemon()
    d.tables = None
    names = set(re.findall(r"^# TYPE (\S+) ", metrics.render(d).decode(), re.M))
    assert names == {"l4lb_build_info", "l4lb_start_time_seconds", "l4lb_config_reloads_total"}


def test_census_falls_back_without_batch_lookups():
    class Old(FakeTables):
        def conn_batches(self, batch=1024):
            raise OSError(22, "Invalid argument")
            yield  # pragma: no cover

    d = fake_daemon()
    d.tables = Old(d.cfg, [(1, 0)] * 5)
    fams = parse(metrics.render(d).decode())
    assert sample(fams, "l4lb_conn_table_entries") == 5
    assert "l4lb_vip_conn_table_entries" not in fams


def test_census_of_many_batches():
    conns = [(1 + i % 3, i % 2) for i in range(20000)]
    t = FakeTables(_config(), conns)
    c = metrics.conn_census(t)
    assert c.total == 20000 and c.per_id
    assert c.by_vip == {0: 10000, 1: 10000}
    assert sum(c.by_real.values()) == 20000
    assert struct.calcsize(CONN_VAL.format) == CONN_VAL.size


def test_promtool_check_metrics(text):
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_http_server_answers_and_refuses_unbindable_addresses():
    async def go():
        d = fake_daemon()
        d.cfg = _listen(d.cfg, "127.0.0.1", 0)
        srv = await metrics.serve(d)
        port = srv.sockets[0].getsockname()[1]
        out = {}
        for path in ("/metrics", "/nope", "/metrics?x=1"):  # "/" is the status page
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            out[path] = await r.read()
            w.close()
        srv.close()
        d.cfg = _listen(d.cfg, "10.254.254.254", 9541)
        with pytest.raises(RuntimeError) as e:
            await metrics.serve(d)
        return out, str(e.value)

    out, err = asyncio.run(go())
    assert out["/metrics"].startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"\r\nContent-Type: text/plain; version=0.0.4" in out["/metrics"]
    assert b"\nl4lb_vip_packets_total{" in out["/metrics"]
    assert out["/metrics?x=1"].startswith(b"HTTP/1.0 200 OK\r\n")
    assert out["/nope"].startswith(b"HTTP/1.0 404")
    assert err.startswith("metrics.listen 10.254.254.254:9541: cannot listen")
    assert "no interface of this node has that address" in err


def test_a_failing_scrape_is_a_500_and_the_server_lives_on():
    async def go():
        d = fake_daemon()
        d.cfg = _listen(d.cfg, "127.0.0.1", 0)
        srv = await metrics.serve(d)
        port = srv.sockets[0].getsockname()[1]
        good = d.stats
        d.stats = lambda: 1 / 0
        got = []
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            got.append(await r.read())
            w.close()
            d.stats = good
        srv.close()
        return got

    bad, good = asyncio.run(go())
    assert bad.startswith(b"HTTP/1.0 500") and b"ZeroDivisionError" in bad
    assert good.startswith(b"HTTP/1.0 200")


def _listen(cfg, host: str, port: int):
    """cfg with metrics.listen = host:port (port 0, an ephemeral port, only here)."""
    return dataclasses.replace(cfg, metrics=MetricsConfig(
        listen=Endpoint(ipaddress.ip_address(host), port)))


class GatedTables(FakeTables):
    """FakeTables whose walks are counted, note their thread, and can be held."""

    def __init__(self, cfg, conns):
        super().__init__(cfg, conns)
        self.walks: list[bool] = []  # one per walk: ran outside the main thread
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Exception | None = None

    def conn_batches(self, batch=1024):
        self.walks.append(threading.current_thread() is not threading.main_thread())
        if not self.gate.wait(10):
            raise RuntimeError("test gate never opened")
        if self.fail is not None:
            raise self.fail
        yield from super().conn_batches(batch)


def test_scrapes_share_one_census_walk_in_a_thread():
    d = fake_daemon()
    d.tables = GatedTables(d.cfg, [(1, 0)] * 3)

    async def go():
        first = await asyncio.gather(*(metrics.scrape(d) for _ in range(5)))
        return first, await metrics.scrape(d)

    first, again = asyncio.run(go())
    assert d.tables.walks == [True]  # six scrapes, one walk, not on the loop's thread
    for text in (*first, again):
        fams = parse(text.decode())
        assert sample(fams, "l4lb_conn_table_entries") == 3
        assert 0 <= sample(fams, "l4lb_conn_table_census_age_seconds") < metrics.CENSUS_MAX_AGE_S
        assert sample(fams, "l4lb_conn_table_census_duration_seconds") >= 0


def test_a_stale_census_answers_while_one_new_walk_runs():
    t = GatedTables(_config(), [(1, 0)] * 3)
    cache = metrics.CensusCache(max_age_s=0.05)

    async def go():
        c1 = await cache.get(t)
        t._conns.append((2, 1))
        await asyncio.sleep(0.06)
        t.gate.clear()  # the next walk blocks in its thread
        stale = [await cache.get(t) for _ in range(3)]  # none of them waits for it
        for _ in range(200):  # the walk's thread has started (and is held)
            if len(t.walks) == 2:
                break
            await asyncio.sleep(0.01)
        stale += [await cache.get(t) for _ in range(3)]
        walks_meanwhile = len(t.walks)
        t.gate.set()
        for _ in range(200):
            if cache.census is not c1:
                break
            await asyncio.sleep(0.01)
        return c1, stale, walks_meanwhile, cache.census

    c1, stale, walks_meanwhile, fresh = asyncio.run(go())
    assert c1.total == 3 and all(c is c1 for c in stale)
    assert walks_meanwhile == 2 and cache.walks == 2  # one walk at a time
    assert fresh.total == 4 and fresh.by_vip == {0: 3, 1: 1}


def test_a_failed_census_walk_keeps_the_old_counts(caplog):
    t = GatedTables(_config(), [(1, 0)] * 3)
    cache = metrics.CensusCache(max_age_s=0.0)  # every get starts a walk

    async def go():
        c1 = await cache.get(t)
        t.fail = RuntimeError("map gone")
        c2 = await cache.get(t)
        await asyncio.sleep(0.2)
        return c1, c2, await cache.get(t)

    c1, c2, c3 = asyncio.run(go())
    assert c1.total == 3 and c2 is c1 and c3 is c1
    assert "conn-table census failed: RuntimeError('map gone')" in caplog.text
    # Without any census yet, the failure reaches the scrape (an HTTP 500 there).
    t2 = GatedTables(_config(), [])
    t2.fail = RuntimeError("map gone")
    with pytest.raises(RuntimeError):
        asyncio.run(metrics.CensusCache().get(t2))
