"""A real Prometheus server (Debian's) scrapes a lab balancer every second; PromQL
increase() and rate() over l4lb_vip_packets_total, asked through its HTTP API,
return the datagrams the test sent.

Prometheus runs inside the balancer's namespace (listening on its loopback), its
storage in the lab's work directory: both go with the lab, also on failure.
"""

import json
import shutil
import sys
import urllib.parse

import pytest

from l4lb.lab import Lab, LabError, wait_for

PORT = 9100
VIP = f"10.99.0.100:{PORT}/udp"
SERIES = f'l4lb_vip_packets_total{{vip="{VIP}"}}'
PROM = "127.0.0.1:9590"  # in lb1's namespace
SENT = 100

@pytest.fixture(scope="module")
def lab():
    if shutil.which("prometheus") is None:
        pytest.fail("Debian's prometheus is not installed: run `make setup`")
    with Lab("tprom", clients=1, balancers=1, reals=2) as lab:
        for r in lab.by_role("real"):
            lab.start_echo(r.name, PORT)
        vips = [{"address": "10.99.0.100", "port": PORT, "protocol": "udp",
                 "real": [{"address": r.ipv4} for r in lab.by_role("real")]}]
        lab.start_l4lb("lb1", lab.balancer_config("lb1", vips))
        conf = lab.workdir / "prometheus.yml"
        conf.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "l4lb",
                                "static_configs": [{"targets": ["127.0.0.1:9541"]}]}]}))
        lab.prom = lab.popen("lb1", ["prometheus", f"--config.file={conf}",
                                     f"--storage.tsdb.path={lab.workdir / 'prom-data'}",
                                     f"--web.listen-address={PROM}"], log_name="prometheus.log")
        yield lab


def query(lab, promql: str, at: float | None = None) -> list:
    """The result of an instant query through the HTTP API (/api/v1/query)."""
    args = {"query": promql} | ({"time": f"{at:.3f}"} if at is not None else {})
    url = f"http://{PROM}/api/v1/query?{urllib.parse.urlencode(args)}"
    if not lab.prom.alive:
        raise LabError(f"prometheus exited: {lab.prom.output()[-1000:]}")
    r = lab.run("lb1", ["curl", "-sS", "--max-time", "5", url], check=False)
    if r.returncode != 0:
        return []  # not listening yet
    body = json.loads(r.stdout)
    assert body["status"] == "success", body
    return body["data"]["result"]


def samples(lab) -> list[tuple[float, float]]:
    """Every stored sample of the VIP's packet counter: (time, value)."""
    res = query(lab, f"{SERIES}[10m]")
    return [(float(t), float(v)) for t, v in res[0]["values"]] if res else []


def send_udp(lab, n: int) -> None:
    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(int(sys.argv[1])):\n"
            f"    s.sendto(b'x' * 64, ('10.99.0.100', {PORT}))\n"
            "    time.sleep(0.002)\n")
    lab.run("client1", [sys.executable, "-c", code, str(n)])


def test_promql_over_a_scraped_node_returns_the_traffic_sent(lab):
    # Scraped a few times before any traffic, and every real up (a datagram sent to
    # a VIP without reals would be dropped, not counted).
    wait_for(lambda: len(samples(lab)) >= 3, 30, interval=0.5, what="3 scrapes of the VIP")
    wait_for(lambda: [r["value"][1] for r in query(lab, "min(l4lb_real_up)")] == ["1"], 20,
             interval=0.5, what="both reals up")
    before = samples(lab)[-1][1]
    lab.run("client1", ["ping", "-c", "1", "-W", "2", "10.99.0.100"], check=False)  # ARP first
    send_udp(lab, SENT)
    # ... and scraped after it: at least two samples that have the whole count.
    wait_for(lambda: sum(v == before + SENT for _, v in samples(lab)) >= 2, 20, interval=0.5,
             what=f"{SENT} packets in two scrapes")
    got = samples(lab)
    # increase() evaluated at a scrape's timestamp over a range reaching back exactly
    # to the last scrape before the traffic: no extrapolation at either end, so the
    # answer is the count itself (ranges are closed at both ends in Prometheus 2).
    t0 = max(t for t, v in got if v == before)
    t1 = got[-1][0]
    window = f"[{round((t1 - t0) * 1000)}ms]"
    inc = query(lab, f"increase({SERIES}{window})", at=t1)
    assert len(inc) == 1, inc
    assert float(inc[0]["value"][1]) == pytest.approx(SENT, abs=1e-6), (got, inc)
    rate = float(query(lab, f"rate({SERIES}{window})", at=t1)[0]["value"][1])
    assert rate * (t1 - t0) == pytest.approx(SENT, rel=1e-6)
    # Over a range wider than the stored scrapes, increase() extrapolates towards the
    # range's start by half a scrape interval at most (none from a counter at 0): never
    # less than what was sent, never more than that share above it.
    wide = float(query(lab, f"increase({SERIES}[10m])", at=t1)[0]["value"][1])
    span = t1 - got[0][0]
    assert SENT <= wide <= SENT * (span + 0.55 * span / (len(got) - 1)) / span + 1e-6, (got, wide)
