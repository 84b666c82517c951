"""`l4lb start` as an operator runs it: health checks, runtime changes through the
CLI, reload, and bad input that must leave the running service unharmed."""

import json
import signal
import sys
import time

import pytest

from l4lb.lab import Lab, wait_for

PORT = 9000
VIP = f"10.99.0.100:{PORT}/tcp"
HC = {"type": "tcp", "interval_s": 0.3, "timeout_s": 0.25, "rise": 2, "fall": 2}


def config(lab, reals=("real1", "real2", "real3"), **extra):
    vip = {"address": "10.99.0.100", "port": PORT,
           "real": [{"address": lab.node(r).ipv4} for r in reals]}
    vip.update(extra)
    return lab.balancer_config("lb1", [vip], healthcheck=HC)


@pytest.fixture(scope="module")
def lab():
    with Lab("tctl", clients=1, balancers=1, reals=4) as lab:
        lab.echo = {r.name: lab.start_echo(r.name, PORT) for r in lab.by_role("real")}
        lab.daemon = lab.start_l4lb("lb1", config(lab))
        yield lab


def reals_of(lab):
    st = lab.l4lb_json("lb1", ["status"])
    return {r["address"]: r for v in st["vips"] if v["vip"] == VIP for r in v["reals"]}


def spread(lab, n=60):
    res = lab.client("client1", ["spread", f"10.99.0.100:{PORT}", "--count", str(n)])
    assert res["ok"] == n, res
    return res["reals"]


def test_rings_are_filled_by_the_kernel(lab):
    # bpf/maglev_fill.c loaded at start (numpy only where it cannot load)
    assert lab.l4lb_json("lb1", ["status"])["ring_fill"] == "kernel"


def test_health_check_takes_a_dead_real_out_and_back(lab):
    lab.echo["real2"].stop()
    try:
        t0 = time.monotonic()
        wait_for(lambda: not reals_of(lab)["10.99.0.32"]["up"], 8, what="real2 down")
        took = time.monotonic() - t0
        # interval x fall, plus the probe timeout and slack for `status` on a busy box
        assert took <= HC["interval_s"] * HC["fall"] + HC["timeout_s"] + 2.5
        assert reals_of(lab)["10.99.0.32"]["in_ring"] is False
        assert "real2" not in spread(lab)
        text = lab.l4lb("lb1", ["status"]).stdout
        assert "DOWN" in text
    finally:
        lab.echo["real2"] = lab.start_echo("real2", PORT)
    wait_for(lambda: reals_of(lab)["10.99.0.32"]["up"], 8, what="real2 up again")
    assert "real2" in spread(lab, 90)


def test_runtime_changes_move_new_flows_and_never_break_open_ones(lab):
    ready = lab.workdir / "ctl-hold.json"
    holder = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "hold",
                                   f"10.99.0.100:{PORT}", "--conns", "30", "--every", "0.05",
                                   "--seconds", "60", "--ready-file", str(ready)])
    wait_for(ready.exists, 15, what="held connections")
    # weight: real1 gets three times the others' share
    lab.l4lb("lb1", ["real", "weight", VIP, "10.99.0.31", "300"])
    got = spread(lab, 200)
    assert got.get("real1", 0) > got.get("real2", 0) + got.get("real3", 0) - 40
    # add real4, drain real1, delete real3: new flows follow, open ones stay
    lab.l4lb("lb1", ["real", "add", VIP, "10.99.0.34", "--weight", "100"])
    lab.l4lb("lb1", ["real", "drain", VIP, "10.99.0.31"])
    lab.l4lb("lb1", ["real", "del", VIP, "10.99.0.33"])
    got = spread(lab, 90)
    assert set(got) == {"real2", "real4"}, got
    assert reals_of(lab)["10.99.0.31"]["weight"] == 0
    assert "10.99.0.33" not in reals_of(lab)
    time.sleep(1.0)
    holder.proc.send_signal(signal.SIGTERM)
    holder.proc.wait(20)
    out = json.loads(holder.output().strip().splitlines()[-1])
    assert out["alive"] == 30 and out["errors"] == 0 and out["moved"] == 0, out
    # back to the file's config
    lab.l4lb("lb1", ["reload"])
    assert set(reals_of(lab)) == {"10.99.0.31", "10.99.0.32", "10.99.0.33"}


def test_reload_applies_the_edited_file(lab):
    cfg = config(lab, reals=("real1", "real4"))
    cfg["vip"].append({"address": "10.99.0.100", "port": 9009,
                       "real": [{"address": "10.99.0.32"}]})
    lab.write_config("lb1", cfg)
    out = lab.l4lb("lb1", ["reload"]).stdout
    assert "10.99.0.100:9009/tcp" in out
    assert set(reals_of(lab)) == {"10.99.0.31", "10.99.0.34"}
    assert set(spread(lab)) == {"real1", "real4"}
    # SIGHUP does the same
    lab.write_config("lb1", config(lab))
    lab.daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: set(reals_of(lab)) == {"10.99.0.31", "10.99.0.32", "10.99.0.33"}, 10,
             what="SIGHUP reload")


@pytest.mark.parametrize("edit, msg", [
    (lambda c: c["vip"][0]["real"][0].update(weight=70000),
     "vip[0].real[0].weight: 70000 is out of range 0..65535"),
    (lambda c: c["vip"][0]["real"][0].update(wieght=1), "did you mean 'weight'"),
    (lambda c: c["node"].update(interfaces=["nosuch0"]), "nosuch0"),
    (lambda c: c["node"].update(conn_timeout_s=99), "[node] changed: that needs a restart"),
    (lambda c: c.update(metrics={"listen": "127.0.0.1:9999"}), "[metrics] changed"),
])
def test_bad_reload_changes_nothing(lab, edit, msg):
    before = lab.l4lb_json("lb1", ["status"])["vips"]
    cfg = config(lab)
    edit(cfg)
    from l4lb.config import dumps_toml
    (lab.workdir / "lb1.toml").write_text(dumps_toml(cfg))
    r = lab.l4lb("lb1", ["reload"], check=False)
    assert r.returncode == 1 and msg in r.stderr, r.stderr
    after = lab.l4lb_json("lb1", ["status"])["vips"]
    assert [(v["vip"], [(x["address"], x["weight"]) for x in v["reals"]]) for v in before] == \
        [(v["vip"], [(x["address"], x["weight"]) for x in v["reals"]]) for v in after]
    assert lab.daemon.alive
    lab.write_config("lb1", config(lab))


def test_malformed_toml_reload(lab):
    (lab.workdir / "lb1.toml").write_text("[node\nname = ")
    r = lab.l4lb("lb1", ["reload"], check=False)
    assert r.returncode == 1 and "invalid TOML at line 1" in r.stderr
    lab.write_config("lb1", config(lab))
    assert lab.daemon.alive


@pytest.mark.parametrize("args, msg", [
    (["real", "weight", VIP, "10.99.0.31", "70000"], "out of range 0..65535"),
    (["real", "add", "10.99.0.100:1/tcp", "10.99.0.31"], "no VIP"),
    (["real", "del", VIP, "10.99.0.99"], "has no real 10.99.0.99"),
    (["real", "add", VIP, "not-an-ip"], "not-an-ip"),
    (["real", "add", VIP, "10.99.0.31"], "duplicate"),
    (["vip", "add", "10.99.0.100", str(PORT)], "duplicate"),
    (["vip", "add", "10.99.0.101", "80", "--mode", "bogus"], "bogus"),
    (["conns", "--vip", "1.2.3.4:5/tcp"], "no VIP"),
])
def test_bad_api_requests_are_refused_whole(lab, args, msg):
    before = reals_of(lab)
    r = lab.l4lb("lb1", args, check=False)
    assert r.returncode != 0 and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3
    assert reals_of(lab) == before
    assert lab.daemon.alive


def test_metrics_port_in_use_fails_start_cleanly(lab):
    cfg = config(lab)
    cfg["node"]["name"] = lab.l4lb_name("lb1b")
    cfg["node"]["api_socket"] = lab.api_socket("lb1b")
    path = lab.write_config("lb1b", cfg)  # same metrics port as the running daemon
    r = lab.run("lb1", [sys.executable, "-m", "l4lb.cli", "start", "-c", str(path)],
                check=False, timeout=60)
    assert r.returncode == 1 and "metrics.listen 127.0.0.1:9541" in r.stderr, r.stderr
    assert lab.daemon.alive
    assert len(spread(lab, 30)) == 3  # the running balancer is unharmed


def test_check_command(lab):
    path = lab.write_config("good", config(lab))
    r = lab.l4lb("lb1", ["check", "-c", str(path)])
    assert "OK" in r.stdout
    cfg = config(lab, mode="dsr")
    cfg["vip"][0]["real"][0]["weight"] = -1
    bad = lab.write_config("bad", cfg)
    r = lab.l4lb("lb1", ["check", "-c", str(bad)], check=False)
    assert r.returncode == 1
    assert "weight" in r.stderr and "mode" in r.stderr  # every error listed
