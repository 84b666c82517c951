"""The lab itself: topology, reachability, isolation between labs, cleanup."""

import json
import os
import subprocess
import sys

import pytest

from l4lb.lab import Lab, LabError, lab_namespaces, live_labs

L4LB = [sys.executable, "-m", "l4lb.cli"]


def _pids_of(prefix):
    from l4lb.lab import _pids_in_netns
    return _pids_in_netns(lab_namespaces(prefix))


def test_full_lab_reachability_and_cleanup():
    with Lab("t1lab", clients=1, balancers=2, reals=3) as lab:
        assert {n.role for n in lab.nodes.values()} == {"client", "balancer", "real"}
        assert len(lab_namespaces("t1lab")) == 7  # bridge + 6 nodes
        pids = []
        for real in lab.by_role("real"):
            pids.append(lab.start_nginx(real.name).proc.pid)
        for real in lab.by_role("real"):
            for addr in (real.ipv4, f"[{real.ipv6}]"):
                out = lab.run("client1", ["curl", "-sS", "--max-time", "5",
                                          f"http://{addr}/"]).stdout
                assert out.strip() == real.name
        # the balancers reach the reals too (they forward to them)
        lab.run("lb1", ["curl", "-sS", "--max-time", "5", "http://10.99.0.31/"])
        # reals keep quiet about the VIP: arp_ignore/arp_announce are set
        r = lab.run("real1", ["sysctl", "-n", "net.ipv4.conf.all.arp_announce"])
        assert r.stdout.strip() == "2"
        assert "10.99.0.100" in lab.run("real1", ["ip", "-4", "addr", "show", "lo"]).stdout
    assert lab_namespaces("t1lab") == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"


def test_two_labs_coexist_and_exception_cleans_up():
    with pytest.raises(RuntimeError):
        with Lab("t2a", clients=1, balancers=0, reals=1) as a, \
                Lab("t2b", clients=1, balancers=0, reals=1) as b:
            sa = a.start_echo("real1")
            b.start_echo("real1")
            # same addresses, separate networks: each client sees its own real
            for lab in (a, b):
                out = lab.run("client1", ["curl", "-sS", "--max-time", "5",
                                          "telnet://10.99.0.31:9000"], check=False,
                              timeout=10)
                assert out.stdout.startswith("real1")
            assert len(_pids_of("t2a")) >= 1
            pid = sa.proc.pid
            raise RuntimeError("boom")
    assert lab_namespaces("t2a") == [] and lab_namespaces("t2b") == []
    assert _pids_of("t2a") == []
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"


def test_prefix_in_use_is_refused_and_stale_is_removed():
    with Lab("t3lab", clients=1, balancers=0, reals=0):
        with pytest.raises(LabError, match="in use"):
            Lab("t3lab", clients=1, balancers=0, reals=0).up()
        assert len(lab_namespaces("t3lab")) == 2  # the live lab is untouched
    # a stale lab (owner gone): its namespaces are removed by the next one
    subprocess.run(["ip", "netns", "add", "t3lab-client1"], check=True)
    with Lab("t3lab", clients=0, balancers=0, reals=1):
        assert lab_namespaces("t3lab") == ["t3lab-br", "t3lab-real1"]
    assert lab_namespaces("t3lab") == []


def test_cli_up_status_down():
    env = dict(os.environ)
    try:
        r = subprocess.run(L4LB + ["lab", "up", "--prefix", "t4cli", "--reals", "2"],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert "real2" in r.stdout and "02:99:00:00:1e:20" in r.stdout
        r = subprocess.run(L4LB + ["lab", "status", "--prefix", "t4cli", "--json"],
                           capture_output=True, text=True, timeout=30)
        labs = json.loads(r.stdout)
        assert [n["name"] for n in labs[0]["nodes"]] == ["client1", "lb1", "lb2", "real1",
                                                         "real2"]
        assert labs[0]["nodes"][3]["ipv4"] == "10.99.0.31"
        # a second `up` with the same prefix: one-line error, exit 2, lab intact
        r = subprocess.run(L4LB + ["lab", "up", "--prefix", "t4cli"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and "in use" in r.stderr and len(r.stderr.splitlines()) == 1
        assert len(lab_namespaces("t4cli")) == 6
    finally:
        r = subprocess.run(L4LB + ["lab", "down", "--prefix", "t4cli"], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 0
    assert lab_namespaces("t4cli") == []
    assert all(lab["prefix"] != "t4cli" for lab in live_labs())


@pytest.mark.parametrize("args, msg", [
    (["lab", "up", "--prefix", "Bad_Prefix"], "invalid"),
    (["lab", "up", "--prefix", "t5x", "--reals", "99"], "out of range"),
])
def test_cli_bad_arguments(args, msg):
    r = subprocess.run(L4LB + args, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and msg in r.stderr
    assert lab_namespaces("t5x") == []


def test_cli_refuses_without_root():
    # nobody, but allowed to read and search any directory (CAP_DAC_READ_SEARCH as an
    # ambient capability): the checkout may sit where other users cannot read (a mktemp
    # dir), and the refusal under test must come from the uid check, not from import.
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] + L4LB
                       + ["lab", "up", "--prefix", "t6root"], capture_output=True, text=True,
                       timeout=30, cwd="/")
    assert r.returncode == 2, r.stderr
    assert "needs root" in r.stderr
    assert lab_namespaces("t6root") == []
