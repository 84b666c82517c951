"""VRRP on the wire, in the namespace lab: two l4lb agents; l4lb against the
Debian keepalived (VRRPv3, VRRPv2, VRRPv2 with auth PASS) in both roles; and
the SIGKILL case of keepalived issue #2361 (a killed master cannot remove its
VIP).

Agents run as `python -m l4lb.vrrp.agent` inside the node namespaces and
report through their --status-file; keepalived runs in the foreground with its
own pid files in the lab's workdir.  Lab.down() kills every process left in
the lab's namespaces, also when a test fails.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from l4lb.lab import Lab, wait_for

pytestmark = pytest.mark.timeout(150)

VIP = "10.99.0.100"
VIP6 = "fd99::100"
INTERVAL = 0.1
# Master_Down_Interval of the priority-100 backup: 3 * 0.1 + (256 - 100) / 256 * 0.1
MDI_100 = 3 * INTERVAL + (256 - 100) / 256 * INTERVAL
SKEW_100 = (256 - 100) / 256 * INTERVAL
SLACK = 0.5  # process scheduling and polling on a loaded 2-core machine

TIMES: dict[str, float] = {}


# ---- helpers -----------------------------------------------------------------------


def agent_conf(priority: int, *, version: int = 3, interval: float = INTERVAL,
               auth: str | None = None, vips: tuple[str, ...] = (f"{VIP}/24",),
               preempt_delay: float = 0.0, name: str = "VI_1") -> str:
    lines = [
        "[node]", 'name = "lb"', 'interfaces = ["eth0"]', "",
        "[[vrrp]]", f'name = "{name}"', 'interface = "eth0"', "vrid = 51",
        f"priority = {priority}", f"version = {version}", f"advert_interval_s = {interval}",
        f"preempt_delay_s = {preempt_delay}", "vips = [" + ", ".join(f'"{v}"' for v in vips) + "]",
    ]
    if auth:
        lines.append(f'auth_pass = "{auth}"')
    return "\n".join(lines) + "\n"


class Agent:
    """An l4lb VRRP agent process in a lab node."""

    count = 0

    def __init__(self, lab: Lab, node: str, conf: str, *args: str) -> None:
        Agent.count += 1
        tag = f"{node}-agent{Agent.count}"
        self.lab, self.node = lab, node
        self.conf = lab.workdir / f"{tag}.toml"
        self.conf.write_text(conf)
        self.status_path = lab.workdir / f"{tag}.json"
        self.svc = lab.popen(node, [sys.executable, "-m", "l4lb.vrrp.agent", "-c",
                                    str(self.conf), "--status-file", str(self.status_path),
                                    *args], log_name=f"{tag}.log")

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())["instances"]["VI_1"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return {}

    def wait_state(self, state: str, timeout: float = 5.0) -> dict:
        def ok():
            if not self.svc.alive and self.svc.proc.returncode not in (0, None):
                raise AssertionError(f"{self.node} agent exited: {self.svc.output()[-2000:]}")
            st = self.status()
            return st if st.get("state") == state else None
        try:
            return wait_for(ok, timeout, 0.01, f"{self.node} agent {state}")
        except TimeoutError:
            raise AssertionError(f"{self.node} is {self.status().get('state')}, not {state}; "
                                 f"log:\n{self.svc.output()[-2000:]}") from None

    def kill(self) -> float:
        t = time.time()
        self.svc.stop(signal.SIGKILL)
        return t

    def term(self) -> float:
        t = time.time()
        self.svc.proc.send_signal(signal.SIGTERM)
        self.svc.proc.wait(5)
        assert self.svc.proc.returncode == 0, self.svc.output()[-2000:]
        return t


class Keepalived:
    """keepalived (VRRP only) in the foreground in a lab node."""

    count = 0

    def __init__(self, lab: Lab, node: str, priority: int, *, version: int,
                 interval: float, auth: str | None = None) -> None:
        Keepalived.count += 1
        d = lab.workdir / f"ka-{node}-{Keepalived.count}"
        d.mkdir()
        auth_block = (f"    authentication {{\n        auth_type PASS\n        auth_pass {auth}\n"
                      "    }\n") if auth else ""
        conf = d / "keepalived.conf"
        conf.write_text(f"""global_defs {{
    router_id {node}
    vrrp_version {version}
    vrrp_garp_master_delay 0
}}
vrrp_instance VI_1 {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int {interval:g}
{auth_block}    virtual_ipaddress {{
        {VIP}/24 dev eth0
    }}
}}
""")
        self.svc = lab.popen(node, ["keepalived", "-n", "-l", "-D", "-G", "-P", "-f", str(conf),
                                    "-p", str(d / "keepalived.pid"),
                                    "-r", str(d / "vrrp.pid"), "-c", str(d / "checkers.pid")],
                             log_name=f"ka-{node}-{Keepalived.count}.log")

    def term(self) -> float:
        t = time.time()
        self.svc.proc.send_signal(signal.SIGTERM)  # the parent stops its VRRP child
        self.svc.proc.wait(10)
        return t


def addrs(lab: Lab, node: str) -> set[str]:
    out = lab.run(node, ["ip", "-j", "addr", "show", "dev", "eth0"]).stdout
    return {a["local"] for a in json.loads(out)[0]["addr_info"]}


def holders(lab: Lab, vip: str = VIP) -> set[str]:
    return {n for n in ("lb1", "lb2") if vip in addrs(lab, n)}


def wait_holders(lab: Lab, want: set[str], timeout: float = 5.0, vip: str = VIP) -> None:
    try:
        wait_for(lambda: holders(lab, vip) == want, timeout, 0.02, f"{vip} held by {want}")
    except TimeoutError:
        raise AssertionError(f"{vip} held by {holders(lab, vip)}, wanted {want}") from None


def neigh_mac(lab: Lab, ip: str = VIP, node: str = "client1") -> str | None:
    out = lab.run(node, ["ip", "-j", "neigh", "show", ip, "dev", "eth0"]).stdout
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr") if entries else None


def wait_neigh(lab: Lab, mac: str, ip: str = VIP, timeout: float = 2.0) -> None:
    try:
        wait_for(lambda: neigh_mac(lab, ip) == mac, timeout, 0.02, f"client neigh {ip} {mac}")
    except TimeoutError:
        raise AssertionError(f"client's neighbour entry for {ip} is {neigh_mac(lab, ip)}, "
                             f"not {mac}") from None


def ping(lab: Lab, ip: str = VIP, count: int = 1, interval: float = 0.2) -> bool:
    return lab.run("client1", ["ping", "-n", "-q", "-c", str(count), "-i", str(interval),
                               "-W", "1", ip], check=False, timeout=30).returncode == 0


def in_echos(lab: Lab, node: str) -> int:
    lines = [ln.split() for ln in lab.run(node, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Icmp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["InEchos"])


def took(agent: Agent, t0: float) -> float:
    return agent.status()["last_transition"]["time"] - t0


def record(what: str, seconds: float) -> None:
    TIMES[what] = seconds
    print(f"\n[vrrp timing] {what}: {seconds * 1000:.0f} ms")


# ---- two l4lb agents ---------------------------------------------------------------------


def test_l4lb_pair_failover_sigkill_sigterm_and_preempt():
    with Lab("tvrrp1", clients=1, balancers=2, reals=0) as lab:
        mac1, mac2 = lab.node("lb1").mac, lab.node("lb2").mac
        lb1 = Agent(lab, "lb1", agent_conf(150))
        lb1.wait_state("master")
        lb2 = Agent(lab, "lb2", agent_conf(100))
        lb2.wait_state("backup")
        wait_for(lambda: lb2.status().get("master_address") == "10.99.0.21", 3, 0.02)
        assert holders(lab) == {"lb1"}
        assert ping(lab) and neigh_mac(lab) == mac1
        st2 = lb2.status()
        assert st2["counters"]["adverts_accepted"] > 0 and st2["counters"]["rejected"] == {}

        # SIGKILL: the backup waits Master_Down_Interval, then takes over
        t0 = lb1.kill()
        lb2.wait_state("master", 3)
        dt = took(lb2, t0)
        record("l4lb->l4lb SIGKILL takeover (MDI 360 ms)", dt)
        assert lb2.status()["last_transition"]["reason"] == "master_down"
        assert dt < MDI_100 + SLACK
        # the new master's gratuitous ARPs move the client, no ARP request needed
        wait_neigh(lab, mac2)
        assert ping(lab) and neigh_mac(lab) == mac2

        # restart lb1 (priority 150, preempt): it removes its stale VIP and takes back
        lb1 = Agent(lab, "lb1", agent_conf(150))
        lb1.wait_state("master", 5)
        lb2.wait_state("backup", 3)
        assert lb1.status()["counters"]["stale_vips_removed"] == 1
        assert lb2.status()["last_transition"]["reason"] == "higher_priority"
        wait_holders(lab, {"lb1"})
        wait_neigh(lab, mac1)
        assert ping(lab)

        # SIGTERM: priority 0, the backup takes over after Skew_Time (61 ms), not MDI
        t0 = lb1.term()
        lb2.wait_state("master", 3)
        dt = took(lb2, t0)
        record("l4lb->l4lb SIGTERM takeover (skew 61 ms)", dt)
        assert lb2.status()["last_transition"]["reason"] == "master_released"
        assert dt < MDI_100
        assert holders(lab) == {"lb2"}  # lb1 removed the VIP before exiting
        st1 = json.loads(lb1.status_path.read_text())["instances"]["VI_1"]
        assert st1["state"] == "initialize" and st1["counters"]["priority_zero_sent"] == 1
        wait_neigh(lab, mac2)
        assert ping(lab)


def test_l4lb_pair_ipv6_unsolicited_na():
    with Lab("tvrrp6", clients=1, balancers=2, reals=0) as lab:
        mac1, mac2 = lab.node("lb1").mac, lab.node("lb2").mac
        conf = dict(vips=(f"{VIP6}/64",))
        lb1 = Agent(lab, "lb1", agent_conf(150, **conf))
        lb1.wait_state("master")
        lb2 = Agent(lab, "lb2", agent_conf(100, **conf))
        lb2.wait_state("backup")
        wait_for(lambda: (lb2.status().get("master_address") or "").startswith("fe80::"), 3,
                 0.02)  # IPv6 adverts come from the link-local address
        wait_holders(lab, {"lb1"}, vip=VIP6)
        assert ping(lab, VIP6) and neigh_mac(lab, VIP6) == mac1
        t0 = lb1.term()
        lb2.wait_state("master", 3)
        record("l4lb->l4lb IPv6 SIGTERM takeover", took(lb2, t0))
        wait_holders(lab, {"lb2"}, vip=VIP6)
        wait_neigh(lab, mac2, VIP6)  # unsolicited NA with the override flag
        assert ping(lab, VIP6)
        assert lb2.status()["counters"]["decode_errors"] == {}


# ---- keepalived issue #2361: SIGKILL leaves the VIP behind --------------------------------


def test_sigkill_stale_vip_is_harmless_and_cleaned_issue_2361():
    with Lab("tvrrp2", clients=1, balancers=2, reals=0) as lab:
        mac1, mac2 = lab.node("lb1").mac, lab.node("lb2").mac
        # lb1 with permanent VIPs: what keepalived (and any agent) leaves when killed
        lb1 = Agent(lab, "lb1", agent_conf(150), "--vip-lifetime", "0")
        lb1.wait_state("master")
        lb2 = Agent(lab, "lb2", agent_conf(100))  # default: VIP lifetime 3 s, renewed
        lb2.wait_state("backup")
        assert ping(lab) and neigh_mac(lab) == mac1

        t0 = lb1.kill()
        lb2.wait_state("master", 3)
        record("#2361 SIGKILL takeover", took(lb2, t0))
        # the issue: the dead agent could not remove its VIP, both nodes hold it now
        assert holders(lab) == {"lb1", "lb2"}
        # the fix, part 1: the new master's gratuitous ARPs repoint the client at once
        wait_neigh(lab, mac2)
        e1, e2 = in_echos(lab, "lb1"), in_echos(lab, "lb2")
        assert ping(lab, count=20, interval=0.01)
        assert in_echos(lab, "lb1") == e1  # not one packet reaches the stale holder
        assert in_echos(lab, "lb2") - e2 == 20  # the client's traffic: only through lb2
        assert neigh_mac(lab) == mac2

        # the fix, part 2: a restarted agent starts as Backup and drops the stale VIP
        lb1 = Agent(lab, "lb1", agent_conf(150, preempt_delay=30))  # stays backup for 30 s
        st1 = lb1.wait_state("backup", 5)
        assert st1["counters"]["stale_vips_removed"] == 1
        assert "vrrp VI_1: removed stale VIP 10.99.0.100/24" in lb1.svc.output()
        assert holders(lab) == {"lb2"}
        assert lb2.status()["state"] == "master" and ping(lab) and neigh_mac(lab) == mac2

        # the fix, part 3: VIPs carry a lifetime the master renews; a killed master's
        # VIP is deleted by the kernel when it runs out, without any process
        assert lb2.status()["vip_lifetime_s"] == 3
        out = lab.run("lb2", ["ip", "-4", "addr", "show", "dev", "eth0", "to", VIP]).stdout
        assert "valid_lft 3sec" in out or "valid_lft 2sec" in out, out
        # renewed every second: still held more than one lifetime after the takeover
        since = lb2.status()["last_transition"]["time"]
        time.sleep(max(0.0, since + 3.5 - time.time()))
        assert "lb2" in holders(lab) and lb2.status()["state"] == "master"
        t0 = lb2.kill()
        lb1.wait_state("master", 3)
        wait_neigh(lab, mac1)
        assert "lb2" in holders(lab)
        wait_holders(lab, {"lb1"}, timeout=6)
        record("#2361 stale VIP expired after SIGKILL (lifetime 3 s)", time.time() - t0)
        assert ping(lab) and neigh_mac(lab) == mac1


# ---- keepalived interop ---------------------------------------------------------------------

KA_CASES = [
    pytest.param(3, None, 0.1, id="v3"),
    pytest.param(2, None, 1.0, id="v2"),
    pytest.param(2, "s3cret", 1.0, id="v2-auth"),
]


@pytest.mark.parametrize("version, auth, interval", KA_CASES)
def test_keepalived_interop(version, auth, interval):
    prefix = {3: "tvka3", 2: "tvka2"}[version] + ("a" if auth else "")
    mdi = 3 * interval + (256 - 50) / 256 * (interval if version == 3 else 1)
    with Lab(prefix, clients=1, balancers=2, reals=0) as lab:
        mac1, mac2 = lab.node("lb1").mac, lab.node("lb2").mac
        conf = agent_conf(100, version=version, interval=interval, auth=auth)

        # keepalived MASTER (lb1, 150) + l4lb BACKUP (lb2, 100)
        ka = Keepalived(lab, "lb1", 150, version=version, interval=interval, auth=auth)
        wait_holders(lab, {"lb1"}, timeout=3 * interval + 6)
        l4 = Agent(lab, "lb2", conf)
        l4.wait_state("backup")
        wait_for(lambda: l4.status()["counters"]["adverts_accepted"] >= 2, 3 * interval + 2,
                 0.02, "l4lb accepting keepalived's adverts")
        st = l4.status()
        assert st["master_address"] == "10.99.0.21" and st["master_priority"] == 150
        assert st["counters"]["rejected"] == {}, st["counters"]
        assert holders(lab) == {"lb1"} and ping(lab) and neigh_mac(lab) == mac1

        t0 = ka.term()  # keepalived sends priority 0 and removes its VIP
        l4.wait_state("master", 3 * interval + 3)
        record(f"keepalived->l4lb v{version}{'+auth' if auth else ''} SIGTERM takeover",
               took(l4, t0))
        assert l4.status()["last_transition"]["reason"] == "master_released"
        wait_holders(lab, {"lb2"})
        wait_neigh(lab, mac2)
        assert ping(lab)

        # l4lb MASTER (lb2, 100) + keepalived BACKUP (lb1, 50)
        ka = Keepalived(lab, "lb1", 50, version=version, interval=interval, auth=auth)
        # keepalived would take the VIP after its Master_Down_Interval if it did not accept
        # l4lb's adverts: wait past that
        time.sleep(mdi + 1.5)
        assert ka.svc.alive, ka.svc.output()[-2000:]
        assert holders(lab) == {"lb2"}, ka.svc.output()[-3000:]
        assert l4.status()["state"] == "master"
        assert l4.status()["counters"]["rejected"] == {}

        t0 = l4.term()  # l4lb sends priority 0: keepalived takes over after its skew time
        wait_holders(lab, {"lb1"}, timeout=3 * interval + 3)
        record(f"l4lb->keepalived v{version}{'+auth' if auth else ''} SIGTERM takeover "
               "(VIP seen on lb1)", time.time() - t0)
        wait_neigh(lab, mac1)
        assert ping(lab)
        assert "Entering MASTER STATE" in ka.svc.output()

