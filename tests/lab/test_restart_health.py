"""A restarted daemon keeps its health verdicts (issue 17): a real that was DOWN when
the daemon was killed stays out of the ring after the restart until it passes `rise`
checks, so no new connection is sent to it and refused."""

import signal
import threading
import time

import pytest

from l4lb.lab import Lab, wait_for

PORT = 9000
VIP = f"10.99.0.100:{PORT}/tcp"
HC = {"type": "tcp", "interval_s": 0.3, "timeout_s": 0.25, "rise": 3, "fall": 2}


@pytest.fixture(scope="module")
def lab():
    with Lab("trst", clients=1, balancers=1, reals=2) as lab:
        lab.echo = {r.name: lab.start_echo(r.name, PORT) for r in lab.by_role("real")}
        lab.cfg = lab.balancer_config("lb1", [{
            "address": "10.99.0.100", "port": PORT,
            "real": [{"address": lab.node(r).ipv4} for r in ("real1", "real2")]}],
            healthcheck=HC)
        lab.daemon = lab.start_l4lb("lb1", lab.cfg)
        yield lab


def real2(lab) -> dict:
    st = lab.l4lb_json("lb1", ["status"])
    return next(r for v in st["vips"] if v["vip"] == VIP for r in v["reals"]
                if r["address"] == lab.node("real2").ipv4)


def test_a_real_down_before_a_restart_stays_down_until_rise_passes(lab):
    lab.echo["real2"].stop()
    wait_for(lambda: not real2(lab)["up"], 10, what="real2 DOWN")
    lab.daemon.stop(signal.SIGKILL)  # XDP and the pinned maps stay: forwarding goes on

    # New connections all through the restart and after it: none may be refused.
    done = threading.Event()
    results: list[dict] = []

    def load():
        while not done.is_set():
            results.append(lab.client("client1", ["spread", f"10.99.0.100:{PORT}",
                                                  "--count", "50", "--timeout", "3"]))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        lab.daemon = lab.start_l4lb("lb1", lab.cfg)
        r = real2(lab)
        assert r["up"] is False and r["in_ring"] is False, r
        time.sleep(HC["interval_s"] * HC["rise"] + 1.5)  # long enough for a wrong "up"
        assert real2(lab)["in_ring"] is False
    finally:
        done.set()
        t.join(60)
    assert len(results) >= 2
    ok = sum(x["ok"] for x in results)
    errors = [x["errors"] for x in results if x["errors"]]
    assert errors == [] and ok == 50 * len(results), (errors, ok)
    assert all(set(x["reals"]) == {"real1"} for x in results), results
    assert "starts DOWN, as saved before the restart" in lab.daemon.output()

    # The real comes back: UP after `rise` passing checks, and new flows reach it again.
    lab.echo["real2"] = lab.start_echo("real2", PORT)
    t0 = time.monotonic()
    wait_for(lambda: real2(lab)["in_ring"], 10, what="real2 UP again")
    assert time.monotonic() - t0 >= HC["interval_s"] * (HC["rise"] - 1)
    got = lab.client("client1", ["spread", f"10.99.0.100:{PORT}", "--count", "60"])
    assert got["ok"] == 60 and "real2" in got["reals"], got
