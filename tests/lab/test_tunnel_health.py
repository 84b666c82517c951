"""Health checks through the tunnel (issue 17): for a tun VIP the probe is sent the
way client traffic is (addressed to the VIP, encapsulated to the real), so a real
without decap fails its check instead of staying green while its flows blackhole.
IPv4 and IPv6; the balancer holds the VIPs itself (the replies come from an address
of its own: bpf/hc_tunnel.c gives them the real's address back before routing)."""

import time

import pytest

from l4lb.lab import Lab, wait_for

PORT = 9001
HC = {"type": "tcp", "interval_s": 0.3, "timeout_s": 0.25, "rise": 2, "fall": 2}
VIPS = {4: "10.99.0.100", 6: "fd99::100"}


@pytest.fixture(scope="module")
def lab():
    with Lab("ttun", clients=1, balancers=1, reals=2) as lab:
        for r in lab.by_role("real"):
            lab.start_echo(r.name, PORT)
        lab.decap("real1")  # real2: no decap (yet)
        vips = [{"address": VIPS[f], "port": PORT, "mode": "tun",
                 "real": [{"address": r.ipv4 if f == 4 else r.ipv6}
                          for r in lab.by_role("real")]} for f in (4, 6)]
        lab.cfg = lab.balancer_config("lb1", vips, healthcheck=HC)
        lab.daemon = lab.start_l4lb("lb1", lab.cfg)
        lab.ready = time.monotonic()  # its checks run from before this
        yield lab


def reals(lab, fam: int) -> dict[str, dict]:
    st = lab.l4lb_json("lb1", ["status"])
    key = f"{VIPS[fam]}:{PORT}/tcp" if fam == 4 else f"[{VIPS[fam]}]:{PORT}/tcp"
    nodes = {(r.ipv4 if fam == 4 else r.ipv6): r.name for r in lab.by_role("real")}
    return {nodes[r["address"]]: r for v in st["vips"] if v["vip"] == key for r in v["reals"]}


def spread(lab, fam: int, n: int = 60) -> dict:
    target = f"{VIPS[4]}:{PORT}" if fam == 4 else f"[{VIPS[6]}]:{PORT}"
    return lab.client("client1", ["spread", target, "--count", str(n), "--timeout", "2"])


def test_a_real_without_decap_fails_its_tunnel_check(lab):
    down_at: dict[int, float] = {}

    def both_down() -> bool:
        for fam in (4, 6):
            if fam not in down_at and not reals(lab, fam)["real2"]["up"]:
                down_at[fam] = time.monotonic()
        return len(down_at) == 2

    wait_for(both_down, 10, interval=0.05, what="real2 DOWN on both VIPs")
    for fam in (4, 6):
        # interval x fall, plus the probe timeout and slack for `status` on a busy box
        assert down_at[fam] - lab.ready <= HC["interval_s"] * HC["fall"] + HC["timeout_s"] + 2.5
        r = reals(lab, fam)
        assert r["real2"]["via"] == "tunnel" and r["real2"]["in_ring"] is False, r
        assert r["real2"]["last_check"].startswith("timeout"), r  # its packets went nowhere
        assert r["real1"]["up"] and r["real1"]["in_ring"], r
        got = spread(lab, fam)  # new flows all reach the real that decapsulates
        assert got["ok"] == 60 and set(got["reals"]) == {"real1"}, got


def test_with_decap_every_real_is_up_and_stays_up(lab):
    t0 = time.monotonic()
    lab.decap("real2")
    for fam in (4, 6):
        wait_for(lambda fam=fam: reals(lab, fam)["real2"]["in_ring"], 10,
                 what=f"real2 UP (IPv{fam})")
    assert time.monotonic() - t0 >= HC["interval_s"] * (HC["rise"] - 1)
    checks = {fam: {n: r for n, r in reals(lab, fam).items()} for fam in (4, 6)}
    time.sleep(HC["interval_s"] * 8)  # several rounds of checks: nothing flaps
    for fam in (4, 6):
        now = reals(lab, fam)
        assert all(r["up"] and r["in_ring"] and r["last_check"] == "ok" for r in now.values()), now
        assert all(r["via"] == "tunnel" for r in checks[fam].values())
        got = spread(lab, fam, 90)
        assert got["ok"] == 90 and set(got["reals"]) == {"real1", "real2"}, got


def test_a_reload_to_dr_reports_the_mode_change_and_checks_directly(lab):
    lab.cfg["vip"][0]["mode"] = "dr"
    lab.write_config("lb1", lab.cfg)
    out = lab.l4lb("lb1", ["reload"]).stdout
    assert f"{VIPS[4]}:{PORT}/tcp: mode tun -> dr" in out, out
    st = lab.l4lb_json("lb1", ["status"])
    modes = {v["vip"]: (v["mode"], {r["via"] for r in v["reals"]}) for v in st["vips"]}
    assert modes == {f"{VIPS[4]}:{PORT}/tcp": ("dr", {"direct"}),
                     f"[{VIPS[6]}]:{PORT}/tcp": ("tun", {"tunnel"})}, modes
