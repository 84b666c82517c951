"""Helpers shared by the lab's VRRP failover tests: VRRP state through the CLI,
held connections through l4lb.lab.client, killing a master the hard way."""

from __future__ import annotations

import json
import signal
import sys

from l4lb.lab import Lab, broken, end_hold, wait_for  # noqa: F401 - tests import them from here


def vrrp_state(lab: Lab, node: str, instance: str | None = None) -> str | None:
    """The node's VRRP state (of `instance`, else of the first one); None when its
    daemon does not answer."""
    r = lab.l4lb(node, ["status", "--json"], check=False, timeout=10)
    if r.returncode != 0:
        return None
    insts = json.loads(r.stdout).get("vrrp") or [{}]
    if instance is not None:
        insts = [v for v in insts if v.get("name") == instance] or [{}]
    return insts[0].get("state")


def wait_state(lab: Lab, node: str, state: str, timeout: float,
               instance: str | None = None) -> None:
    try:
        wait_for(lambda: vrrp_state(lab, node, instance) == state, timeout, 0.05,
                 f"{node} VRRP {state}")
    except TimeoutError:
        raise AssertionError(f"{node} is {vrrp_state(lab, node, instance)}, not {state}; log:\n"
                             f"{lab.daemons[node].output()[-3000:]}") from None


def conns(lab: Lab, node: str, vip_key: str) -> dict[int, str]:
    """Client port -> real address of the VIP's flows in the node's conn table."""
    rows = lab.l4lb_json(node, ["conns", "--vip", vip_key, "--limit", "100000"])
    return {r["cport"]: r["real"] for r in rows}


def start_hold(lab: Lab, tag: str, target: str, count: int, seconds: float = 150,
               udp: bool = False):
    """`count` long-lived echo connections from client1 to `target` ("addr:port",
    "[v6]:port"), one exchange every 0.1 s; returns once all are connected. `udp`:
    UDP flows on connected sockets instead, each reply checked for its real."""
    ready = lab.workdir / f"{tag}-ready.json"
    svc = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "hold", target,
                                "--conns", str(count), "--every", "0.1", "--seconds",
                                str(seconds), "--ready-file", str(ready)] +
                    (["--udp"] if udp else []), log_name=f"{tag}.log")
    wait_for(ready.exists, 20, what=f"{tag}: {count} connections")
    assert json.loads(ready.read_text())["connected"] == count, svc.output()[-2000:]
    return svc


def kill_and_unplug(lab: Lab, node: str) -> None:
    lab.daemons[node].stop(signal.SIGKILL)  # XDP stays attached: the link goes too
    lab.run(node, ["ip", "link", "set", "dev", "eth0", "down"])
