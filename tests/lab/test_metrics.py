"""The Prometheus endpoint of `l4lb start`, scraped over HTTP in the lab: exact
packet and byte counts for a known flow, a downed real seen within its fall time,
`promtool check metrics` on a real scrape, and a metrics address we cannot bind
refused at start with nothing attached."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from l4lb import metrics
from l4lb.lab import Lab, wait_for

PORT = 9100
VIP = f"10.99.0.100:{PORT}/udp"
HC = {"type": "tcp", "interval_s": 0.3, "timeout_s": 0.25, "rise": 2, "fall": 2}
METRICS_URL = "http://127.0.0.1:9541/metrics"
# Ethernet + IPv4 (no options) + UDP headers: the XDP program counts whole frames
# (data_end - data).
FRAME_OVERHEAD = 14 + 20 + 8


def vips(lab):
    # UDP VIP; the tcp health check probes the echo server's TCP side of the port.
    return [{"address": "10.99.0.100", "port": PORT, "protocol": "udp",
             "real": [{"address": r.ipv4} for r in lab.by_role("real")]}]


@pytest.fixture(scope="module")
def lab():
    # lb2 never runs a daemon: the bad-start test checks it is left without XDP.
    with Lab("tmet", clients=1, balancers=2, reals=3) as lab:
        lab.echo = {r.name: lab.start_echo(r.name, PORT) for r in lab.by_role("real")}
        lab.daemon = lab.start_l4lb("lb1", lab.balancer_config("lb1", vips(lab), healthcheck=HC))
        wait_for(lambda: all(v == 1 for v in values(scrape(lab), "l4lb_real_up").values()), 10,
                 what="reals up")
        yield lab


def scrape_text(lab) -> str:
    r = lab.run("lb1", ["curl", "-sS", "--fail", "--max-time", "5", METRICS_URL])
    return r.stdout


def scrape(lab) -> dict:
    """{sample name: {frozenset(labels): value}}"""
    out: dict = {}
    for fam in text_string_to_metric_families(scrape_text(lab)):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def values(m: dict, name: str, **labels) -> dict:
    """{real or (label values): value} of the samples of `name` matching `labels`."""
    got = {}
    for key, v in m.get(name, {}).items():
        d = dict(key)
        if all(d.get(k) == want for k, want in labels.items()):
            got[d.get("real", tuple(sorted(d.items())))] = v
    return got


def one(m: dict, name: str, **labels) -> float:
    got = values(m, name, **labels)
    assert len(got) == 1, (name, labels, got)
    return next(iter(got.values()))


def send_udp(lab, n: int, size: int, sport: int) -> None:
    """n datagrams of `size` payload bytes from client1:sport to the VIP: one flow."""
    code = ("import socket, sys, time\n"
            "n, size, sport, port = map(int, sys.argv[1:])\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind(('0.0.0.0', sport))\n"
            "for i in range(n):\n"
            "    s.sendto(bytes([65 + i % 26]) * size, ('10.99.0.100', port))\n"
            "    time.sleep(0.002)\n")
    lab.run("client1", [sys.executable, "-c", code, str(n), str(size), str(sport), str(PORT)])


def test_a_known_flow_is_counted_exactly(lab):
    n, size = 57, 200
    frame = FRAME_OVERHEAD + size
    # resolve the VIP's MAC first, so that no datagram waits on ARP
    lab.run("client1", ["ping", "-c", "1", "-W", "2", "10.99.0.100"], check=False)
    before = scrape(lab)
    send_udp(lab, n, size, sport=40001)
    vip_before = one(before, "l4lb_vip_packets_total", vip=VIP)
    wait_for(lambda: one(scrape(lab), "l4lb_vip_packets_total", vip=VIP) >= vip_before + n, 10,
             what=f"{n} packets counted")
    time.sleep(0.3)  # nothing more may arrive
    after = scrape(lab)

    def delta(name, **labels):
        b, a = values(before, name, **labels), values(after, name, **labels)
        return {k: a[k] - b.get(k, 0) for k in a}

    assert one(after, "l4lb_vip_packets_total", vip=VIP) - vip_before == n
    assert delta("l4lb_vip_bytes_total", vip=VIP) == {(("vip", VIP),): n * frame}
    assert delta("l4lb_vip_new_flows_total", vip=VIP) == {(("vip", VIP),): 1}
    # the whole flow went to one real, and the counters of the others did not move
    pk = delta("l4lb_real_packets_total", vip=VIP)
    assert sorted(pk.values()) == [0, 0, n], pk
    real = next(r for r, v in pk.items() if v == n)
    assert delta("l4lb_real_bytes_total", vip=VIP)[real] == n * frame
    assert sum(delta("l4lb_real_bytes_total", vip=VIP).values()) == n * frame
    assert delta("l4lb_real_new_flows_total", vip=VIP)[real] == 1
    # the global view agrees: n forwarded in DR mode, one conn-table miss, then hits
    assert delta("l4lb_xdp_packets_total", verdict="tx", reason="dr") == \
        {(("reason", "dr"), ("verdict", "tx")): n}
    assert sum(delta("l4lb_conn_table_misses_total").values()) == 1
    assert sum(delta("l4lb_conn_table_hits_total").values()) == n - 1
    # conn-table counts come from a census walked at most every CENSUS_MAX_AGE_S:
    # a scrape that finds it older starts a new walk, a later one sees its counts.
    wait_for(lambda: one(scrape(lab), "l4lb_real_conn_table_entries", vip=VIP, real=real) >= 1,
             metrics.CENSUS_MAX_AGE_S + 10, what="the census counting the flow")
    assert one(scrape(lab), "l4lb_conn_table_entries") >= 1
    # the conn table names the same real
    conns = lab.l4lb_json("lb1", ["conns", "--vip", VIP])
    assert [c["real"] for c in conns if c["cport"] == 40001] == [real]
    # and `l4lb stats` (the API) reads the same counters
    st = {v["vip"]: v for v in lab.l4lb_json("lb1", ["stats"])["vips"]}[VIP]
    assert st["packets"] == one(after, "l4lb_vip_packets_total", vip=VIP)
    assert st["bytes"] == one(after, "l4lb_vip_bytes_total", vip=VIP)
    assert {r["address"]: r["packets"] for r in st["reals"]} == \
        values(after, "l4lb_real_packets_total", vip=VIP)


def test_promtool_check_metrics_on_a_real_scrape(lab):
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: run `make setup` (Debian package prometheus)")
    text = scrape_text(lab)
    assert "l4lb_vip_packets_total{" in text and "l4lb_real_up{" in text
    r = lab.run("lb1", ["promtool", "check", "metrics"], input=text, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # the HTTP side: content type, 404 elsewhere
    head = lab.run("lb1", ["curl", "-sS", "-o", "/dev/null", "-w",
                           "%{http_code} %{content_type}", METRICS_URL]).stdout
    assert head == "200 text/plain; version=0.0.4; charset=utf-8", head
    code = lab.run("lb1", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                           "http://127.0.0.1:9541/nope"]).stdout  # / is the status page
    assert code == "404"


def test_a_downed_real_shows_up_0_within_its_fall_time(lab):
    real = lab.node("real2").ipv4
    m = scrape(lab)
    assert one(m, "l4lb_real_up", vip=VIP, real=real) == 1
    fails_before = one(m, "l4lb_healthcheck_failures_total", vip=VIP, real=real)
    lab.echo["real2"].stop()
    t0 = time.monotonic()
    wait_for(lambda: one(scrape(lab), "l4lb_real_up", vip=VIP, real=real) == 0, 5,
             interval=0.02, what="l4lb_real_up 0")
    took = time.monotonic() - t0
    # fall checks, one interval apart, each failing within its timeout; plus slack
    # for the scrape (nsenter + curl) and a loaded machine, as test_control allows
    assert took <= HC["interval_s"] * HC["fall"] + HC["timeout_s"] + 1.0, took
    m = scrape(lab)
    assert one(m, "l4lb_real_in_ring", vip=VIP, real=real) == 0
    assert one(m, "l4lb_healthcheck_last_success", vip=VIP, real=real) == 0
    assert one(m, "l4lb_healthcheck_failures_total", vip=VIP, real=real) >= fails_before + 2
    assert one(m, "l4lb_real_weight", vip=VIP, real=real) == 100  # down is not drained
    assert values(m, "l4lb_real_up", vip=VIP) == {lab.node("real1").ipv4: 1, real: 0,
                                                  lab.node("real3").ipv4: 1}
    lab.echo["real2"] = lab.start_echo("real2", PORT)
    wait_for(lambda: one(scrape(lab), "l4lb_real_up", vip=VIP, real=real) == 1, 5,
             what="l4lb_real_up 1 again")


def test_unbindable_metrics_address_fails_start_with_nothing_attached(lab):
    cfg = lab.balancer_config("lb2", vips(lab), healthcheck=HC)
    cfg["metrics"] = {"listen": "10.254.254.254:9541"}  # on no interface of lb2
    path = lab.write_config("lb2-bad", cfg)
    t0 = time.monotonic()
    r = lab.run("lb2", [sys.executable, "-m", "l4lb.cli", "start", "-c", str(path)],
                check=False, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "metrics.listen 10.254.254.254:9541" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr
    assert time.monotonic() - t0 < 30  # refused before compiling the program
    links = json.loads(lab.run("lb2", ["ip", "-j", "link", "show", "eth0"]).stdout)
    assert links and "xdp" not in links[0], links
    addrs = lab.run("lb2", ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout
    assert "10.99.0.100" not in addrs, addrs
    assert not Path(lab.api_socket("lb2")).exists()
    assert not list(Path("/sys/fs/bpf/l4lb").glob(f"{lab.l4lb_name('lb2')}*"))
    # the running balancer is unharmed
    assert lab.daemon.alive
    assert one(scrape(lab), "l4lb_build_info", node=lab.l4lb_name("lb1")) == 1
