"""`l4lb import` in the lab: keepalived runs the paper's lb01 file, l4lb runs what `l4lb import`
made of the lb02 file, and the two form one VRRP group that fails over both ways on the track
script, with keepalived's weight rule on both sides.

The files are the paper's (tests/import_vectors/paper), with the lab's VIP and a track script
that tests a flag file instead of `killall -0 haproxy`, so the test can make it fail; interval 1 s
instead of 2 to keep the test short. Both nodes: priority 101/100, weight 2, VRRPv2, auth PASS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from l4lb.lab import Lab, wait_for

pytestmark = pytest.mark.timeout(150)

VIP = "10.99.0.100"
KA_CONF = """global_defs {{
    router_id {router_id} # Router identifier, unique for each node
}}
# Define a script to check the HAProxy process
vrrp_script chk_haproxy {{
    script "/usr/bin/test -e {flag}" # Check if the haproxy process exists
    interval 1 # Check every 2 seconds
    weight 2 # If the check fails, reduce priority by 2
}}
vrrp_instance VI_1 {{
    state {state} # Initial state is MASTER
    interface eth0 # Network interface bound to VRRP advertisements
    virtual_router_id 51 # Virtual router ID, must be the same for the same cluster group
    priority {priority} # Priority, MASTER should be higher than BACKUP
    advert_int 1 # Advertisement interval (seconds)
    authentication {{
        auth_type PASS
        auth_pass 1111 # Authentication password, consistent across all nodes in the cluster
    }}
    track_script {{
        chk_haproxy # Call the check script defined above
    }}
    virtual_ipaddress {{
        {vip}/24 # Defined virtual IP (VIP)
    }}
}}
"""


def holders(lab: Lab) -> set[str]:
    out = set()
    for n in ("lb1", "lb2"):
        info = json.loads(lab.run(n, ["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)
        if any(a["local"] == VIP for a in info[0]["addr_info"]):
            out.add(n)
    return out


def wait_holders(lab: Lab, want: set[str], timeout: float, why: str) -> None:
    try:
        wait_for(lambda: holders(lab) == want, timeout, 0.05, why)
    except TimeoutError:
        raise AssertionError(f"{why}: {VIP} held by {holders(lab)}, wanted {want}") from None


def test_keepalived_and_converted_l4lb_fail_over_both_ways():
    with Lab("timport", clients=1, balancers=2, reals=0) as lab:
        wd = lab.workdir
        flag1, flag2 = wd / "lb1-ok", wd / "lb2-ok"
        flag1.touch()
        flag2.touch()
        lb01 = wd / "lb01-keepalived.conf"
        lb01.write_text(KA_CONF.format(router_id="LVS_DEVEL", flag=flag1, state="MASTER", priority=101, vip=VIP))
        lb02 = wd / "lb02-keepalived.conf"
        lb02.write_text(KA_CONF.format(router_id="LVS_DEVEL02", flag=flag2, state="BACKUP", priority=100, vip=VIP))

        # lb02's file through the real command line
        out = wd / "lb2.toml"
        conv = subprocess.run([sys.executable, "-m", "l4lb.cli", "import", str(lb02), "--node", "lb2",
                               "-o", str(out)], capture_output=True, text=True, timeout=60)
        assert conv.returncode == 0, conv.stderr
        assert "adds 2 to the priority while the script succeeds" in conv.stderr
        inst = tomllib.loads(out.read_text())["vrrp"][0]
        assert (inst["priority"], inst["version"], inst["auth_pass"]) == (100, 2, "1111")
        assert inst["track_scripts"][0]["weight"] == 2

        kad = wd / "ka"
        kad.mkdir()
        ka = lab.popen("lb1", ["keepalived", "-n", "-l", "-D", "-G", "-P", "-f", str(lb01),
                               "-p", str(kad / "k.pid"), "-r", str(kad / "v.pid"), "-c", str(kad / "c.pid")],
                       log_name="ka-lb1.log")
        wait_holders(lab, {"lb1"}, 15, "keepalived (103) takes the VIP")
        status_file = wd / "lb2-status.json"
        l4 = lab.popen("lb2", [sys.executable, "-m", "l4lb.vrrp.agent", "-c", str(out),
                               "--status-file", str(status_file)], log_name="l4lb-lb2.log")

        def st() -> dict:
            try:
                return json.loads(status_file.read_text())["instances"]["VI_1"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                return {}

        def wait_state(state: str, timeout: float, why: str) -> dict:
            try:
                return wait_for(lambda: st() if st().get("state") == state else None, timeout, 0.05, why)
            except TimeoutError:
                raise AssertionError(f"{why}: l4lb is {st().get('state')}; log:\n{l4.output()[-2000:]}\n"
                                     f"keepalived:\n{ka.output()[-2000:]}") from None

        # both scripts succeed: keepalived 101+2 = 103 is master, l4lb 100+2 = 102 backup
        wait_state("backup", 10, "l4lb joins as backup")
        wait_for(lambda: st().get("priority") == 102 and st().get("master_priority") == 103, 10, 0.05,
                 "l4lb at 102 hears keepalived at 103")
        assert st()["counters"]["rejected"] == {}, st()["counters"]
        assert holders(lab) == {"lb1"}

        # lb1's check fails: keepalived drops to 101 (not 99), l4lb's 102 wins: keepalived -> l4lb
        flag1.unlink()
        wait_state("master", 15, "l4lb takes over when keepalived's script fails")
        wait_holders(lab, {"lb2"}, 10, "the VIP moves to l4lb")
        wait_for(lambda: st().get("priority") == 102, 5, 0.05, "l4lb advertises 102")

        # lb1's check recovers: keepalived is back at 103 and preempts: l4lb -> keepalived
        flag1.touch()
        wait_state("backup", 15, "keepalived takes the VIP back")
        wait_holders(lab, {"lb1"}, 10, "the VIP moves back to keepalived")
        assert st()["master_priority"] == 103

        # l4lb's own check fails: 100 + 0; it stays backup and keepalived keeps the VIP
        flag2.unlink()
        wait_for(lambda: st().get("priority") == 100, 10, 0.05, "l4lb's track script failing lowers it to 100")
        assert st()["state"] == "backup" and holders(lab) == {"lb1"}
        assert ka.alive and l4.alive
