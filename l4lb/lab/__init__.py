"""The network-namespace lab: a bridge and named nodes with real traffic.

Used by tests, benches and `make demo`, and from the shell as `l4lb lab`. It lives in
the source checkout only: the wheel does not ship l4lb.lab (pyproject's package list).

Topology: one namespace "<prefix>-br" holds bridge br0; every node (client,
balancer, real) is a namespace "<prefix>-<node>" whose eth0 is one end of a
veth pair; the other end, "p-<node>", is a port of br0. Addresses come from
10.99.0.0/24 and fd99::/64 and never leave the lab: nothing is routed to the host.

With router=True (ECMP scale-out, README: VRRP or ECMP) a "router" node stands between a
second bridge br1, where the clients live (10.99.128.0/24, fd99:128::/64), and br0
(balancers, reals; default route via the router at 10.99.0.1 / fd99::1). It
forwards with an L4 multipath hash; start_frr() runs FRR in it (and in balancers).

Reals hold the VIPs on lo with arp_ignore=1 / arp_announce=2, so that only the
balancer answers ARP for a VIP (without arp_announce=2 a real's ARP requests
would teach the client the VIP's MAC is the real's).

A lab records its owner in /run/l4lb/lab/<prefix>.json. A lab whose owner is gone
is stale and is removed before a new one with the same prefix is built; a live
one is refused. Cleanup kills every process in the lab's namespaces, also on
exceptions and Ctrl-C.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pyroute2 import NetNS, netns

from l4lb.errors import L4lbError

STATE_DIR = Path("/run/l4lb/lab")
PIN_ROOT = "/sys/fs/bpf/l4lb"
NETNS_DIR = Path("/run/netns")
SUBNET4 = ipaddress.IPv4Network("10.99.0.0/24")
SUBNET6 = ipaddress.IPv6Network("fd99::/64")
VIP4 = ipaddress.IPv4Address("10.99.0.100")
VIP6 = ipaddress.IPv6Address("fd99::100")
BRIDGE = "br0"
IFA_F_NODAD = 0x02
# Host part of addresses and last MAC byte by role: clients .10+, balancers
# .20+, reals .30+. The MAC's fifth byte says the role too.
ROLE_BASE = {"client": 10, "balancer": 20, "real": 30}
ROLE_PREFIX = {"client": "client", "balancer": "lb", "real": "real"}
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
# router=True: the clients' subnet behind the router, and the router's addresses.
CLIENT_SUBNET4 = ipaddress.IPv4Network("10.99.128.0/24")
CLIENT_SUBNET6 = ipaddress.IPv6Network("fd99:128::/64")
ROUTER4, ROUTER6 = "10.99.0.1", "fd99::1"
ROUTER_CLIENT4, ROUTER_CLIENT6 = "10.99.128.1", "fd99:128::1"
CLIENT_BRIDGE = "br1"
FRR_DIR = Path("/var/run/frr")  # FRR's per-pathspace state: /var/run/frr/<netns>/


class LabError(L4lbError):
    """A lab cannot be built or used; the message says what to do."""


@dataclass
class Node:
    name: str
    role: str
    netns: str
    port: str  # the bridge port (in the bridge namespace) facing this node
    ipv4: str
    ipv6: str
    mac: str
    ifindex: int = 0

    @property
    def nspath(self) -> str:
        return str(NETNS_DIR / self.netns)


@dataclass
class Service:
    """A process started in a node; stop() ends it and its children."""

    node: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            _killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def check_environment() -> None:
    """Refuse early, with the fix, where the lab cannot work."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veth, sysctls); run it with sudo")
    if not Path("/proc/self/ns/net").exists():
        raise LabError("this kernel has no network namespace support (CONFIG_NET_NS); "
                       "the lab cannot run here")
    for tool in ("nsenter",):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is missing; run `make setup` (Debian package util-linux)")


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state_path(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.json"


def read_state(prefix: str) -> dict | None:
    try:
        return json.loads(_state_path(prefix).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def lab_namespaces(prefix: str) -> list[str]:
    return sorted(n for n in netns.listnetns() if n.startswith(prefix + "-"))


def _pids_in_netns(names: list[str]) -> list[int]:
    """Every process whose network namespace is one of `names`."""
    inodes = set()
    for n in names:
        try:
            inodes.add(os.stat(NETNS_DIR / n).st_ino)
        except FileNotFoundError:
            pass
    pids = []
    if not inodes:
        return pids
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                pids.append(int(d))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            pass
    return pids


def destroy(prefix: str) -> list[str]:
    """Kill the lab's processes and remove its namespaces and state. Idempotent."""
    names = lab_namespaces(prefix)
    state = read_state(prefix) or {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_in_netns(names)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
            time.sleep(0.02)
    for n in names:
        try:
            netns.remove(n)
        except OSError:
            pass
    # Balancers of this lab pin maps and keep state under their node names.
    for pattern in (f"{PIN_ROOT}/{prefix}-*", f"/run/l4lb/{prefix}-*", f"{FRR_DIR}/{prefix}-*"):
        for path in glob.glob(pattern):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
    if str(state.get("workdir", "")).startswith(tempfile.gettempdir() + "/l4lb-lab-"):
        shutil.rmtree(state["workdir"], ignore_errors=True)
    _state_path(prefix).unlink(missing_ok=True)
    return names


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def remove_stale(prefix: str) -> None:
    """Remove a lab of this prefix whose owner is gone; refuse a live one."""
    state = read_state(prefix)
    names = lab_namespaces(prefix)
    if state and _pid_alive(state.get("owner_pid")):
        raise LabError(f"lab prefix '{prefix}' is in use by a live lab (pid {state['owner_pid']}); "
                       f"pick another prefix or run `l4lb lab down --prefix {prefix}`")
    if state and state.get("owner_pid") is None and names:
        raise LabError(f"lab prefix '{prefix}' is in use by a lab started with `l4lb lab up`; "
                       f"run `l4lb lab down --prefix {prefix}` first or pick another prefix")
    if names or state:
        destroy(prefix)


class Lab:
    """Build a lab of clients, balancers and reals; use as a context manager.

    >>> with Lab("demo", clients=1, balancers=2, reals=3) as lab:
    ...     lab.run("client1", ["curl", "-s", "http://10.99.0.31/"])
    """

    def __init__(self, prefix: str = "l4lab", clients: int = 1, balancers: int = 2,
                 reals: int = 3, mtu: int = 1500, persistent: bool = False,
                 vips: tuple[str, ...] = (str(VIP4), str(VIP6)), router: bool = False):
        if not PREFIX_RE.match(prefix):
            raise LabError(f"lab prefix '{prefix}' is invalid: use 1-12 lowercase letters "
                           "and digits, starting with a letter")
        if not (0 <= clients <= 9 and 0 <= balancers <= 9 and 0 <= reals <= 60):
            raise LabError("lab size out of range: clients 0..9, balancers 0..9, reals 0..60")
        self.prefix = prefix
        self.mtu = mtu
        self.persistent = persistent  # `l4lb lab up`: outlives this process
        self.vips = [ipaddress.ip_address(v) for v in vips]
        self.nodes: dict[str, Node] = {}
        self.services: list[Service] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"l4lb-lab-{prefix}-"))  # logs, configs
        self._counts = {"client": clients, "balancer": balancers, "real": reals}
        self.brns = f"{prefix}-br"
        self.router = router  # clients behind a router node (ECMP lab)

    # ----------------------------------------------------------------- build
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Lab:
        try:
            check_environment()
            remove_stale(self.prefix)
        except LabError:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self._write_state()  # claim the prefix before building anything
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._write_state()
        return self

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"prefix": self.prefix, "owner_pid": None if self.persistent else os.getpid(),
                 "created": time.time(), "bridge_netns": self.brns,
                 "workdir": str(self.workdir),
                 "vips": [str(v) for v in self.vips],
                 "nodes": [asdict(n) for n in self.nodes.values()]}
        tmp = _state_path(self.prefix).with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(_state_path(self.prefix))

    def _build(self) -> None:
        netns.create(self.brns)
        with NetNS(self.brns) as br:
            br.link("add", ifname=BRIDGE, kind="bridge", br_mcast_snooping=0,
                    br_forward_delay=0)
            bridx = br.link_lookup(ifname=BRIDGE)[0]
            br.link("set", index=bridx, state="up", mtu=self.mtu)
            lo = br.link_lookup(ifname="lo")[0]
            br.link("set", index=lo, state="up")
            cbridx = bridx
            if self.router:
                br.link("add", ifname=CLIENT_BRIDGE, kind="bridge", br_mcast_snooping=0,
                        br_forward_delay=0)
                cbridx = br.link_lookup(ifname=CLIENT_BRIDGE)[0]
                br.link("set", index=cbridx, state="up", mtu=self.mtu)
                self._add_router(br, bridx, cbridx)
            for role in ("client", "balancer", "real"):
                for i in range(1, self._counts[role] + 1):
                    self._add_node(br, cbridx if role == "client" else bridx, role, i)
        for node in self.nodes.values():
            self._configure_node(node)

    def _add_router(self, br: NetNS, bridx: int, cbridx: int) -> None:
        """The router node: eth0 on br0 (ROUTER4), eth1 on br1 (ROUTER_CLIENT4)."""
        node = Node(name="router", role="router", netns=f"{self.prefix}-router",
                    port="p-router", ipv4=ROUTER4, ipv6=ROUTER6, mac="02:99:00:00:01:01")
        netns.create(node.netns)
        for port, ifname, master in (("p-router", "eth0", bridx), ("c-router", "eth1", cbridx)):
            br.link("add", ifname=port, kind="veth",
                    peer={"ifname": ifname, "net_ns_fd": node.netns})
            pidx = br.link_lookup(ifname=port)[0]
            br.link("set", index=pidx, master=master, mtu=self.mtu, state="up")
        self.nodes["router"] = node

    def _add_node(self, br: NetNS, bridx: int, role: str, i: int) -> None:
        name = f"{ROLE_PREFIX[role]}{i}"
        host = ROLE_BASE[role] + i
        behind = self.router and role == "client"  # on br1, behind the router
        node = Node(name=name, role=role, netns=f"{self.prefix}-{name}", port=f"p-{name}",
                    ipv4=str((CLIENT_SUBNET4 if behind else SUBNET4).network_address + host),
                    # reads like the IPv4 host part
                    ipv6=f"fd99:128::{host}" if behind else f"fd99::{host}",
                    mac="02:99:00:00:%02x:%02x" % (ROLE_BASE[role], host))
        netns.create(node.netns)
        br.link("add", ifname=node.port, kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": node.netns})
        pidx = br.link_lookup(ifname=node.port)[0]
        br.link("set", index=pidx, master=bridx, mtu=self.mtu, state="up")
        self.nodes[name] = node

    def _configure_node(self, node: Node) -> None:
        sysctls = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
                   "net.ipv6.conf.eth0.accept_dad": "0"}
        if node.role == "real":
            # Only the balancer may answer ARP for a VIP (README: The lab).
            for dev in ("all", "eth0"):
                sysctls[f"net.ipv4.conf.{dev}.arp_ignore"] = "1"
                sysctls[f"net.ipv4.conf.{dev}.arp_announce"] = "2"
            # Tunnel mode delivers decapsulated packets whose source is the
            # client: loose reverse-path checking keeps them.
            sysctls["net.ipv4.conf.all.rp_filter"] = "0"
            sysctls["net.ipv4.conf.eth0.rp_filter"] = "0"
        if node.role == "router":
            # ECMP over the balancers by an L4 hash: a flow stays on one node, flows spread.
            sysctls.update({"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                            "net.ipv4.fib_multipath_hash_policy": "1",
                            "net.ipv6.fib_multipath_hash_policy": "1",
                            "net.ipv6.conf.eth1.accept_dad": "0",
                            "net.ipv4.conf.all.rp_filter": "0"})
        self.sysctl(node.name, sysctls)
        with NetNS(node.netns) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            idx = ns.link_lookup(ifname="eth0")[0]
            node.ifindex = idx
            ns.link("set", index=idx, address=node.mac, mtu=self.mtu, state="up")
            ns.addr("add", index=idx, address=node.ipv4, prefixlen=SUBNET4.prefixlen)
            ns.addr("add", index=idx, address=node.ipv6, prefixlen=SUBNET6.prefixlen,
                    flags=IFA_F_NODAD)
            if node.role == "real":
                for vip in self.vips:
                    ns.addr("add", index=lo, address=str(vip),
                            prefixlen=vip.max_prefixlen, flags=IFA_F_NODAD)
            if self.router:
                self._route_node(ns, node)

    def _route_node(self, ns: NetNS, node: Node) -> None:
        """router=True: the router's client side; everyone else's default route."""
        if node.role == "router":
            idx = ns.link_lookup(ifname="eth1")[0]
            ns.link("set", index=idx, mtu=self.mtu, state="up")
            ns.addr("add", index=idx, address=ROUTER_CLIENT4, prefixlen=CLIENT_SUBNET4.prefixlen)
            ns.addr("add", index=idx, address=ROUTER_CLIENT6, prefixlen=CLIENT_SUBNET6.prefixlen,
                    flags=IFA_F_NODAD)
            return
        gw4, gw6 = (ROUTER_CLIENT4, ROUTER_CLIENT6) if node.role == "client" else (ROUTER4, ROUTER6)
        ns.route("add", dst="0.0.0.0/0", gateway=gw4)
        ns.route("add", dst="::/0", gateway=gw6, family=10)

    # ------------------------------------------------------------- teardown
    def down(self) -> None:
        for svc in self.services:
            try:
                svc.stop(timeout=2.0)
            except Exception:  # noqa: BLE001 - teardown goes on regardless
                pass
        self.services.clear()
        destroy(self.prefix)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------ using it
    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"no node '{name}' in lab '{self.prefix}' "
                           f"(nodes: {', '.join(self.nodes)})") from None

    def by_role(self, role: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == role]

    def nsenter(self, name: str) -> list[str]:
        """argv prefix that runs a program in the node's network namespace."""
        return ["nsenter", f"--net={self.node(name).nspath}"]

    def run(self, name: str, argv: list[str], check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        """Run a program in a node and wait for it; stdout/stderr captured as text."""
        res = subprocess.run(self.nsenter(name) + list(argv), capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise LabError(f"{name}: {' '.join(argv)} exited {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip()[-500:]}")
        return res

    def sysctl(self, name: str, values: dict[str, str]) -> None:
        args = [f"{k}={v}" for k, v in values.items()]
        self.run(name, ["sysctl", "-q", "-w", *args])

    def popen(self, name: str, argv: list[str], log_name: str | None = None,
              env: dict | None = None, cwd: str | Path | None = None) -> Service:
        """Start a program in a node; it is stopped when the lab goes down. `cwd`: where
        `python -m bench.NAME` finds bench/ (the repository root)."""
        log = self.workdir / (log_name or f"{name}-{Path(argv[0]).name}-{len(self.services)}.log")
        fh = open(log, "wb")
        proc = subprocess.Popen(self.nsenter(name) + list(argv), stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd)
        fh.close()
        svc = Service(node=name, argv=list(argv), proc=proc, log=log)
        self.services.append(svc)
        return svc

    def wait_listening(self, svc: Service, port: int, proto: str = "tcp",
                       timeout: float = 10.0) -> None:
        """Wait until the service's namespace has a socket listening on `port`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not svc.alive:
                raise LabError(f"{svc.node}: {' '.join(svc.argv)} exited: {svc.output()[-500:]}")
            if _listening(svc.proc.pid, port, proto):
                return
            time.sleep(0.02)
        raise LabError(f"{svc.node}: nothing listens on {proto}/{port} after {timeout}s")

    def start_echo(self, name: str, port: int = 9000) -> Service:
        """The identify/echo server (l4lb.lab.echoserver) on TCP and UDP `port`."""
        svc = self.popen(name, [sys.executable, "-m", "l4lb.lab.echoserver", "--name", name,
                                "--port", str(port)])
        self.wait_listening(svc, port)
        return svc

    def start_nginx(self, name: str, port: int = 80) -> Service:
        """nginx answering every request with the node's name."""
        d = self.workdir / f"nginx-{name}"
        d.mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(f"""
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
    server {{
        listen {port} reuseport;
        listen [::]:{port} reuseport;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
""")
        svc = self.popen(name, ["nginx", "-c", str(conf), "-p", str(d)])
        self.wait_listening(svc, port)
        return svc

    def start_iperf3(self, name: str, port: int = 5201) -> Service:
        svc = self.popen(name, ["iperf3", "-s", "-p", str(port)])
        self.wait_listening(svc, port)
        return svc

    def start_frr(self, name: str, conf: str, daemons: tuple[str, ...] = ("zebra", "bfdd", "bgpd"),
                  timeout: float = 20.0) -> list[Service]:
        """FRR in a node, one instance per namespace (README: The lab): the daemons run in the
        foreground with pathspace <netns> (`vtysh -N <netns>`), config `conf`."""
        import grp  # noqa: PLC0415
        import pwd  # noqa: PLC0415

        node = self.node(name)
        if not Path("/usr/lib/frr/zebra").exists():
            raise LabError("FRR is not installed; run `make setup` (Debian package frr)")
        try:
            uid, gid = pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid
        except KeyError:
            raise LabError("FRR's user 'frr' is missing; reinstall the frr package") from None
        d = FRR_DIR / node.netns  # FRR's state dir; holds the config too (readable by frr)
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, uid, gid)
        (d / "frr.conf").write_text(conf)
        os.chown(d / "frr.conf", uid, gid)
        # One at a time, each up before the next, in the order of `daemons` (zebra first,
        # as watchfrr does): a bgpd that registers its BFD peers before bfdd is connected
        # to zebra was once left without BFD sessions for good.
        deadline = time.monotonic() + timeout
        svcs: list[Service] = []
        for dmn in daemons:
            (d / f"{dmn}.vty").unlink(missing_ok=True)  # a dead instance's socket says nothing
            svcs.append(self.popen(name, [f"/usr/lib/frr/{dmn}", "-N", node.netns, "-f",
                                          str(d / "frr.conf")],
                                   log_name=f"{name}-frr-{dmn}-{len(self.services)}.log"))
            while not (d / f"{dmn}.vty").exists():
                if not svcs[-1].alive:
                    raise LabError(f"{name}: {dmn} exited: {svcs[-1].output()[-500:]}")
                if time.monotonic() > deadline:
                    raise LabError(f"{name}: FRR's {dmn} did not start in {timeout}s")
                time.sleep(0.05)
        while time.monotonic() < deadline:
            for svc in svcs:
                if not svc.alive:
                    raise LabError(f"{name}: {svc.argv[0]} exited: {svc.output()[-500:]}")
            r = subprocess.run(["vtysh", "-N", node.netns, "-c", "show version"],
                               capture_output=True, text=True, timeout=10)
            if r.returncode == 0:
                return svcs
            time.sleep(0.1)
        raise LabError(f"{name}: FRR did not answer vtysh in {timeout}s")

    def vtysh(self, name: str, *commands: str, check: bool = True) -> str:
        """vtysh against the node's FRR instance."""
        argv = ["vtysh", "-N", self.node(name).netns]
        for c in commands:
            argv += ["-c", c]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise LabError(f"{name}: vtysh {' '.join(commands)}: {r.stderr.strip()[-300:]}")
        return r.stdout

    def status(self) -> dict:
        return read_state(self.prefix) or {}

    # ------------------------------------------------------------- l4lb
    def l4lb_name(self, name: str) -> str:
        """The balancer's node name in its config: unique across labs (pin paths)."""
        return f"{self.prefix}-{name}"

    def api_socket(self, name: str) -> str:
        return f"/run/l4lb/{self.l4lb_name(name)}.sock"

    def balancer_config(self, name: str, vips: list[dict], xdp_mode: str = "generic",
                        healthcheck: dict | None = None, **sections) -> dict:
        """A config dict for `l4lb start` on a balancer node of this lab."""
        cfg = {"node": {"name": self.l4lb_name(name), "interfaces": ["eth0"],
                        "xdp_mode": xdp_mode, "api_socket": self.api_socket(name),
                        "conn_table_size": 65536},
               # Lenient by default: a lab on a loaded 2-core box must not flap its
               # reals; tests of health checking set their own.
               "healthcheck": healthcheck or {"type": "tcp", "interval_s": 1.0,
                                              "timeout_s": 1.0, "rise": 2, "fall": 3},
               "metrics": {"listen": "127.0.0.1:9541"},
               "vip": vips}
        cfg.update(sections)
        return cfg

    def write_config(self, name: str, cfg: dict) -> Path:
        from l4lb.config import dumps_toml  # noqa: PLC0415

        path = self.workdir / f"{name}.toml"
        path.write_text(dumps_toml(cfg))
        return path

    def start_l4lb(self, name: str, cfg: dict, timeout: float = 60.0) -> Service:
        """`l4lb start` in a balancer node; returns once its API answers."""
        return self.start_l4lb_file(name, self.write_config(name, cfg), timeout)

    def start_l4lb_file(self, name: str, path: Path, timeout: float = 60.0) -> Service:
        """`l4lb start -c path` in a balancer node (a config file as it is); returns
        once its API answers."""
        svc = self.popen(name, [sys.executable, "-m", "l4lb.cli", "start", "-c", str(path)],
                         log_name=f"{name}-l4lb-{len(self.services)}.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not svc.alive:
                raise LabError(f"{name}: l4lb start exited: {svc.output()[-2000:]}")
            r = self.l4lb(name, ["status", "--json"], check=False)
            if r.returncode == 0:
                return svc
            time.sleep(0.2)
        raise LabError(f"{name}: l4lb did not become ready in {timeout}s: {svc.output()[-2000:]}")

    def l4lb(self, name: str, args: list[str], check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the l4lb CLI in a node against that node's daemon."""
        argv = [sys.executable, "-m", "l4lb.cli", *args]
        if args and args[0] not in ("start", "check", "decap", "lab") and "--socket" not in args:
            argv += ["--socket", self.api_socket(name)]
        return self.run(name, argv, check=check, timeout=timeout)

    def l4lb_json(self, name: str, args: list[str]):
        return json.loads(self.l4lb(name, [*args, "--json"]).stdout)

    def decap(self, name: str, mode: str = "generic") -> None:
        """Attach the tunnel decapsulator to a real's eth0."""
        self.run(name, [sys.executable, "-m", "l4lb.cli", "decap", "--iface", "eth0",
                        "--mode", mode])

    def prepare_native(self, name: str) -> None:
        """Make native XDP_TX from a node reach the bridge (README: The lab): an XDP_PASS
        program on the node's bridge port, and tx checksum offload off there."""
        port = self.node(name).port
        self.run_ns(self.brns, [sys.executable, "-c",
                                "import sys; from l4lb.dataplane import loader; "
                                "loader.compile_pass().attach(sys.argv[1], 'native')", port])
        self.run_ns(self.brns, ["ethtool", "-K", port, "tx", "off"])

    def unprepare_native(self, name: str) -> None:
        """Undo prepare_native(): no XDP on the bridge port, checksum offload back on."""
        port = self.node(name).port
        self.run_ns(self.brns, [sys.executable, "-c",
                                "import sys; from l4lb.dataplane import loader; "
                                "loader.detach_xdp(sys.argv[1])", port])
        self.run_ns(self.brns, ["ethtool", "-K", port, "tx", "on"])

    def run_ns(self, nsname: str, argv: list[str], timeout: float = 60) -> None:
        res = subprocess.run(["nsenter", f"--net={NETNS_DIR / nsname}", *argv],
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise LabError(f"{nsname}: {' '.join(argv)} failed: {res.stderr.strip()[-500:]}")

    def client(self, name: str, args: list[str], timeout: float = 120) -> dict:
        """Run l4lb.lab.client in a node and return its JSON report."""
        r = self.run(name, [sys.executable, "-m", "l4lb.lab.client", *args], timeout=timeout)
        return json.loads(r.stdout)


def _listening(pid: int, port: int, proto: str) -> bool:
    """True when the namespace of `pid` has a listening/bound socket on `port`."""
    files = [f"/proc/{pid}/net/{proto}", f"/proc/{pid}/net/{proto}6"]
    for f in files:
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in lines:
            parts = line.split()
            local, st = parts[1], parts[3]
            if int(local.rsplit(":", 1)[1], 16) == port and (proto == "udp" or st == "0A"):
                return True
    return False


def live_labs() -> list[dict]:
    """State of every lab on this machine (for `l4lb lab status`)."""
    out = []
    if STATE_DIR.exists():
        for f in sorted(STATE_DIR.glob("*.json")):
            st = read_state(f.stem)
            if st:
                st["namespaces"] = lab_namespaces(f.stem)
                st["owner_alive"] = (st.get("owner_pid") is None and bool(st["namespaces"])) \
                    or _pid_alive(st.get("owner_pid"))
                out.append(st)
    return out


def end_hold(svc: Service) -> dict:
    """Stop a `client hold` run (SIGTERM) and return its JSON report."""
    svc.proc.send_signal(signal.SIGTERM)
    svc.proc.wait(30)
    return json.loads(svc.output().strip().splitlines()[-1])


def broken(report: dict) -> list:
    """(id, reals seen, error) of the held connections that failed or changed real."""
    return [(d["id"], d["reals"], d["error"]) for d in report["detail"]
            if d["error"] or len(d["reals"]) > 1]


def wait_for(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `pred` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


__all__ = ["Lab", "LabError", "Node", "Service", "VIP4", "VIP6", "destroy", "live_labs",
           "read_state", "remove_stale", "wait_for"]
