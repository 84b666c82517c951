"""The paper's HA pair (section 4.1), converted by `l4lb import` and run as a real l4lb pair.

lb01-keepalived.conf + haproxy.cfg and lb02-keepalived.conf + haproxy.cfg from
tests/import_vectors/paper go through the CLI (`python -m l4lb.cli import ... -o`) as a
user would run it; each result starts unedited with `l4lb start` on lab nodes lb1/lb2, in
front of two reals running nginx on the paper's port 80. Only what the lab forces is
substituted, and the test checks that no other line differs from the paper:
- the addresses: VIP 192.168.1.100 -> the lab's VIP, web1/web2 -> real1/real2;
- the track script: `killall -0 haproxy` -> `test -e FLAG` (root-owned /usr/bin/test, a
  flag file per node), so the test can make lb01's check fail as a stopped haproxy would;
- `--node`: the lab's per-run node names (l4lb_name), which place the API socket and the
  pinned maps where the lab finds and removes them.
Priorities follow keepalived's weight rule: 101 + 2 = 103 on lb01, 100 + 2 = 102 on lb02
while both scripts succeed; lb01's script failing takes it to 101 < 102, and lb02 serves
the VIP; lb01's script recovering takes it back (keepalived preempts by default).
keepalived itself runs the same two files first, as the anchor: the VIP moves the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from l4lb.lab import VIP4, Lab, Service, wait_for

pytestmark = pytest.mark.timeout(180)

PAPER = Path(__file__).resolve().parent.parent / "import_vectors" / "paper"
VIP = str(VIP4)
PORT = 80  # bind *:80 / server web1 192.168.1.20:80
VIP_KEY = f"{VIP}:{PORT}/tcp"
NODES = {"lb1": "lb01", "lb2": "lb02"}  # lab node -> the paper's host
REQUESTS = 40

# A fresh TCP connection per GET (new 5-tuples, so Maglev spreads them); the body is the real's name.
GET = """
import collections, http.client, json, sys
names, errors = collections.Counter(), collections.Counter()
for _ in range(int(sys.argv[2])):
    c = http.client.HTTPConnection(sys.argv[1], 80, timeout=3)
    try:
        c.request("GET", "/")
        names[c.getresponse().read().decode().strip()] += 1
    except OSError as e:
        errors[type(e).__name__] += 1
    finally:
        c.close()
print(json.dumps({"reals": names, "errors": errors}))
"""


def lab_copy(src: Path, dst: Path, subs: dict[str, str], changed_lines: int) -> None:
    """The paper's file with `subs` applied; every other line stays byte for byte."""
    old = src.read_text()
    new = old
    for a, b in subs.items():
        assert a in old, f"{src.name}: {a!r} not in the paper's file"
        new = new.replace(a, b)
    assert len(old.splitlines()) == len(new.splitlines())
    diff = [(x, y) for x, y in zip(old.splitlines(), new.splitlines(), strict=True) if x != y]
    assert len(diff) == changed_lines, diff
    dst.write_text(new)


def convert(lab: Lab, node: str, flag: Path) -> Path:
    """The paper's files for `node`, lab-substituted, through `l4lb import`."""
    wd, paper = lab.workdir, NODES[node]
    web1, web2 = (lab.node(r).ipv4 for r in ("real1", "real2"))
    ka = wd / f"{paper}-keepalived.conf"
    lab_copy(PAPER / ka.name, ka, {"192.168.1.100/24": f"{VIP}/24",
                                   '"/usr/bin/killall -0 haproxy"': f'"/usr/bin/test -e {flag}"'}, 2)
    ha = wd / "haproxy.cfg"
    lab_copy(PAPER / ha.name, ha, {"192.168.1.20:80": f"{web1}:80", "192.168.1.21:80": f"{web2}:80"}, 2)
    out = wd / f"{paper}.toml"
    conv = subprocess.run([sys.executable, "-m", "l4lb.cli", "import", str(ka), str(ha),
                           "--node", lab.l4lb_name(node), "-o", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert conv.returncode == 0, conv.stderr
    assert "adds 2 to the priority while the script succeeds" in conv.stderr, conv.stderr
    return out


def start(lab: Lab, node: str, conf: Path, timeout: float = 90) -> Service:
    """`l4lb start -c conf` in `node`, as written by `l4lb import`; returns once its API answers."""
    return lab.start_l4lb_file(node, conf, timeout)


def vrrp(lab: Lab, node: str) -> dict:
    r = lab.l4lb(node, ["status", "--json"], check=False, timeout=10)
    if r.returncode != 0:
        return {}
    return next((v for v in json.loads(r.stdout).get("vrrp") or [] if v["name"] == "VI_1"), {})


def vip_packets(lab: Lab, node: str) -> int:
    st = lab.l4lb_json(node, ["stats"])
    return next(v["packets"] for v in st["vips"] if v["vip"] == VIP_KEY)


def get(lab: Lab, count: int = REQUESTS) -> dict:
    r = lab.run("client1", [sys.executable, "-c", GET, VIP, str(count)], timeout=120)
    return json.loads(r.stdout)


def holders(lab: Lab) -> set[str]:
    """The balancers that have the VIP on eth0."""
    out = set()
    for n in NODES:
        info = json.loads(lab.run(n, ["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)
        if any(a["local"] == VIP for a in info[0]["addr_info"]):
            out.add(n)
    return out


def keepalived_anchor(lab: Lab, flags: dict[str, Path]) -> None:
    """What keepalived itself does with the same two files: lb01 holds the VIP, loses it to
    lb02 while its script fails, takes it back when the script succeeds again."""
    kas = {}
    for n, paper in NODES.items():
        d = lab.workdir / f"ka-{n}"
        d.mkdir()
        kas[n] = lab.popen(n, ["keepalived", "-n", "-l", "-D", "-G", "-P",
                               "-f", str(lab.workdir / f"{paper}-keepalived.conf"), "-p", str(d / "k.pid"),
                               "-r", str(d / "v.pid"), "-c", str(d / "c.pid")], log_name=f"ka-{n}.log")

    def wait_holders(want: set[str], why: str) -> None:
        try:
            wait_for(lambda: holders(lab) == want, 20, 0.1, why)
        except TimeoutError:
            raise AssertionError(f"keepalived: {why}: {VIP} held by {holders(lab)}, wanted {want}\n"
                                 + "\n".join(s.output()[-1500:] for s in kas.values())) from None

    wait_holders({"lb1"}, "lb01 (103) over lb02 (102)")
    flags["lb1"].unlink()
    wait_holders({"lb2"}, "lb01's script failed (101 < 102)")
    flags["lb1"].touch()
    wait_holders({"lb1"}, "lb01's script recovered (103 > 102)")
    for s in kas.values():
        s.stop()  # keepalived removes its VIP as it stops
    assert holders(lab) == set()


def test_paper_configs_converted_serve_the_vip_and_fail_over_on_the_track_script():
    with Lab("tpair", clients=1, balancers=2, reals=2) as lab:
        flags = {n: lab.workdir / f"haproxy-up-{NODES[n]}" for n in NODES}
        for f in flags.values():
            f.touch()  # the track script succeeds on both nodes
        confs = {n: convert(lab, n, flags[n]) for n in NODES}
        for n, conf in confs.items():
            inst = tomllib.loads(conf.read_text())["vrrp"][0]
            assert (inst["name"], inst["vrid"], inst["priority"], inst["auth_pass"]) == \
                ("VI_1", 51, {"lb1": 101, "lb2": 100}[n], "1111")
            assert inst["track_scripts"][0]["script"] == ["/usr/bin/test", "-e", str(flags[n])]
        keepalived_anchor(lab, flags)  # the same files, before l4lb replaces keepalived
        for r in ("real1", "real2"):
            lab.start_nginx(r, PORT)
        # The converted configs leave xdp_mode at its default, native: on veth, XDP_TX frames
        # reach the bridge only with an XDP program on the bridge port (README: The lab).
        for n in NODES:
            lab.prepare_native(n)
        lab.daemons = {}
        with ThreadPoolExecutor(2) as ex:  # the two compile in parallel
            futs = {n: ex.submit(start, lab, n, confs[n]) for n in NODES}
            for n, f in futs.items():
                lab.daemons[n] = f.result()

        def logs() -> str:
            return "\n".join(f"--- {n}:\n{s.output()[-2500:]}" for n, s in lab.daemons.items())

        def wait_pair(master: str, backup: str, prios: dict[str, int], why: str) -> None:
            want = {master: ("master", prios[master]), backup: ("backup", prios[backup])}
            got = {}

            def ok() -> bool:
                got.update({n: (vrrp(lab, n).get("state"), vrrp(lab, n).get("priority")) for n in NODES})
                return got == want

            try:
                wait_for(ok, 30, 0.1, why)
            except TimeoutError:
                raise AssertionError(f"{why}: (state, priority) {got}, wanted {want}\n{logs()}") from None

        def serve(via: str, why: str) -> None:
            """Fresh connections to the VIP: every one answered, by both reals, through `via`."""
            other = "lb2" if via == "lb1" else "lb1"
            before = {n: vip_packets(lab, n) for n in NODES}
            res = get(lab)
            assert res["errors"] == {} and sum(res["reals"].values()) == REQUESTS, (why, res)
            assert set(res["reals"]) == {"real1", "real2"}, (why, res)
            after = {n: vip_packets(lab, n) for n in NODES}
            assert after[via] - before[via] >= 3 * REQUESTS, (why, before, after)  # SYN, ACK+GET, ACK, FIN...
            assert after[other] == before[other], (why, before, after)

        # Both scripts succeed: lb01 101 + 2 = 103 is master, lb02 100 + 2 = 102 backup.
        wait_pair("lb1", "lb2", {"lb1": 103, "lb2": 102}, "healthy pair")
        assert vrrp(lab, "lb2")["master_priority"] == 103
        # haproxy's `check` became a TCP check with HAProxy's rise 2: wait for both reals up.
        def reals_up(n: str) -> bool:
            return all(r["up"] for r in lab.l4lb_json(n, ["status"])["vips"][0]["reals"])

        for n in NODES:
            wait_for(lambda n=n: reals_up(n), 30, 0.2, f"both reals up on {n}")
        serve("lb1", "lb01 master")

        # lb01's script fails (haproxy stopped): 101 + 0 = 101 < 102, lb02 takes the VIP.
        flags["lb1"].unlink()
        wait_pair("lb2", "lb1", {"lb1": 101, "lb2": 102}, "lb01's track script failed")
        assert vrrp(lab, "lb1")["master_priority"] == 102
        serve("lb2", "lb02 master")

        # lb01's script succeeds again: 103 > 102, and the converted instance preempts.
        flags["lb1"].touch()
        wait_pair("lb1", "lb2", {"lb1": 103, "lb2": 102}, "lb01's track script recovered")
        serve("lb1", "lb01 master again")
        assert all(s.alive for s in lab.daemons.values()), logs()
