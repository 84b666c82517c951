"""Real traffic through a balancer node: DR and tunnel, IPv4 and IPv6, spread over
three reals; long-lived connections keep their real through ring changes, drains
and a restart of the daemon (pinned conn table)."""

import json
import signal
import time

import pytest

from l4lb.lab import Lab, wait_for

PORT_DR, PORT_TUN = 9000, 9001


def vips(reals):
    out = []
    for addr in ("10.99.0.100", "fd99::100"):
        fam6 = ":" in addr
        for port, mode in ((PORT_DR, "dr"), (PORT_TUN, "tun")):
            for proto in ("tcp", "udp"):
                out.append({"address": addr, "port": port, "mode": mode, "protocol": proto,
                            "real": [{"address": r.ipv6 if fam6 else r.ipv4} for r in reals]})
    return out


@pytest.fixture(scope="module")
def lab():
    with Lab("tdp", clients=1, balancers=1, reals=4) as lab:
        reals = lab.by_role("real")
        for r in reals:
            lab.start_echo(r.name, PORT_DR)
            lab.start_echo(r.name, PORT_TUN)
            lab.decap(r.name)
        lab.daemon = lab.start_l4lb("lb1", lab.balancer_config("lb1", vips(reals[:3])))
        yield lab


@pytest.mark.parametrize("vip", ["10.99.0.100", "[fd99::100]"])
@pytest.mark.parametrize("port", [PORT_DR, PORT_TUN], ids=["dr", "tun"])
def test_300_connections_spread_over_three_reals(lab, vip, port):
    res = lab.client("client1", ["spread", f"{vip}:{port}", "--count", "300"])
    assert res["ok"] == 300, res
    assert set(res["reals"]) == {"real1", "real2", "real3"}
    for n in res["reals"].values():
        assert 0.20 * 300 <= n <= 0.47 * 300, res


@pytest.mark.parametrize("vip", ["10.99.0.100", "[fd99::100]"])
@pytest.mark.parametrize("port", [PORT_DR, PORT_TUN], ids=["dr", "tun"])
def test_udp_flows_answered_from_the_vip_each_by_one_real(lab, vip, port):
    """As a DNS or QUIC client sees it: a connected UDP socket per flow accepts only
    replies from the VIP; every flow gets them, always from the same real."""
    res = lab.client("client1", ["hold", f"{vip}:{port}", "--udp", "--conns", "30",
                                 "--every", "0.05", "--seconds", "2"])
    assert res["errors"] == 0, [d for d in res["detail"] if d["error"]]
    assert res["moved"] == 0, [d for d in res["detail"] if len(d["reals"]) > 1]
    assert all(d["exchanges"] >= 10 for d in res["detail"]), res["detail"]
    seen = {d["reals"][0] for d in res["detail"]}
    assert len(seen) >= 2 and seen <= {"real1", "real2", "real3"}, seen


def test_long_lived_connection_survives_add_drain_and_restart(lab):
    vip = "10.99.0.100:9000/tcp"
    ready = lab.workdir / "hold-ready.json"
    holder = lab.popen("client1", [__import__("sys").executable, "-m", "l4lb.lab.client", "hold",
                                   f"10.99.0.100:{PORT_DR}", "--conns", "20", "--every", "0.05",
                                   "--seconds", "60", "--ready-file", str(ready)])
    wait_for(ready.exists, 15, what="long-lived connections")
    assert json.loads(ready.read_text())["connected"] == 20
    # a fourth real: the ring changes, no open connection moves
    lab.l4lb("lb1", ["real", "add", vip, "10.99.0.34"])
    st = lab.l4lb_json("lb1", ["status"])
    assert any(r["address"] == "10.99.0.34" and r["in_ring"]
               for v in st["vips"] if v["vip"] == vip for r in v["reals"])
    time.sleep(1.0)
    # drain the real of some connection: its connections carry on
    conns = lab.l4lb_json("lb1", ["conns", "--vip", vip, "--limit", "1000"])
    drained = conns[0]["real"]
    lab.l4lb("lb1", ["real", "drain", vip, drained])
    res = lab.client("client1", ["spread", f"10.99.0.100:{PORT_DR}", "--count", "60"])
    assert res["ok"] == 60 and f"real{drained.split('.')[-1][-1]}" not in res["reals"]
    time.sleep(1.0)
    # kill -9 the daemon, start it again: XDP kept forwarding, the pinned conn table
    # is reattached, every connection carries on
    lab.daemon.stop(signal.SIGKILL)
    time.sleep(1.0)
    t0 = time.monotonic()
    lab.daemon = lab.start_l4lb("lb1", lab.balancer_config("lb1", vips(lab.by_role("real")[:3])
                                                           ))
    restart_s = time.monotonic() - t0
    time.sleep(1.5)
    holder.proc.send_signal(signal.SIGTERM)
    holder.proc.wait(20)
    out = json.loads(holder.output().strip().splitlines()[-1])
    assert out["errors"] == 0, [d for d in out["detail"] if d["error"]]
    assert out["moved"] == 0, [d for d in out["detail"] if len(d["reals"]) > 1]
    assert out["alive"] == 20
    # forwarding never paused for the restart: no exchange gap near the restart's length
    assert out["max_gap_s"] < max(1.0, restart_s / 2), (out["max_gap_s"], restart_s)
    # the restarted daemon took the connections over (same ids, same reals)
    conns = lab.l4lb_json("lb1", ["conns", "--vip", vip, "--limit", "1000"])
    assert len(conns) >= 20


def test_native_xdp_mode(lab):
    """Native (driver) XDP on veth: XDP_TX frames reach the bridge only when the peer
    port runs an XDP program, and tx checksum offload must be off there (README: The lab)."""
    lab.l4lb("lb1", ["stop"])
    lab.daemon.proc.wait(20)
    lab.prepare_native("lb1")
    try:
        lab.daemon = lab.start_l4lb("lb1", lab.balancer_config(
            "lb1", vips(lab.by_role("real")[:3]), xdp_mode="native"))
        st = lab.l4lb_json("lb1", ["status"])
        assert st["xdp_mode"] == "native"
        for vip, port in (("10.99.0.100", PORT_DR), ("[fd99::100]", PORT_TUN)):
            res = lab.client("client1", ["spread", f"{vip}:{port}", "--count", "300"])
            assert res["ok"] == 300, res
            assert all(0.20 * 300 <= n <= 0.47 * 300 for n in res["reals"].values()), res
    finally:
        lab.unprepare_native("lb1")
