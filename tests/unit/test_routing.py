"""[bgp] config, FRR config text, session parsing, the announce decision and join gate."""

import pytest

from l4lb.config import ConfigError, config_from_dict, config_to_dict, dumps_toml, parse_config
from l4lb.config.bgp import check_bgp_system
from l4lb.routing import announce, frr, service


def base(**bgp):
    b = {"asn": 65001, "router_id": "10.99.0.21",
         "neighbor": [{"address": "10.99.0.1", "asn": 65000}]}
    b.update(bgp)
    return {"node": {"name": "lb1", "interfaces": ["eth0"]},
            "vip": [{"address": "10.99.200.100", "port": 80, "protocol": "tcp",
                     "real": [{"address": "10.99.0.31"}, {"address": "10.99.0.32"}]},
                    {"address": "fd99:200::100", "port": 80, "protocol": "tcp",
                     "real": [{"address": "fd99::31"}]}],
            "sync": {"enabled": True, "listen": "10.99.0.21:9542",
                     "peers": ["10.99.0.22:9542", "10.99.0.23:9542"], "key": "k" * 20},
            "bgp": b}


def errors(data) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data)
    return ei.value.errors


def test_valid_round_trip_and_sync_without_vrrp():
    cfg = config_from_dict(base(
        vip=[{"address": "10.99.200.100", "communities": ["65001:100", "no-export"], "med": 7}],
        communities=["65001:1"]))
    assert cfg.bgp.asn == 65001 and str(cfg.bgp.router_id) == "10.99.0.21"
    assert cfg.bgp.attrs("10.99.200.100") == (("65001:1", "65001:100", "no-export"), 7)
    assert cfg.bgp.attrs("fd99:200::100") == (("65001:1",), None)
    # ECMP: sync needs no vrrp_instance; the config survives dict and TOML round trips
    assert cfg.sync.vrrp_instance is None
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert parse_config(dumps_toml(config_to_dict(cfg))) == cfg


def test_every_bad_field_named():
    errs = errors(base(asn=0, router_id="fd99::1", bfd_rx_ms=5, bfd_tx_ms=70000,
                       bfd_multiplier=1, hold_s=2,
                       neighbor=[{"address": "10.99.0.1", "asn": 65000},
                                 {"address": "10.99.0.1", "asn": 65002},
                                 {"address": "10.99.0.2", "asn": 4294967295,
                                  "password": "has space"}],
                       vip=[{"address": "10.1.1.1"}], communities=["70000:1"]))
    text = "\n".join(errs)
    for field in ("bgp.asn: 0 is out of range", "bgp.router_id: \"fd99::1\" is not an IPv4",
                  "bgp.bfd_rx_ms: 5 is out of range 10..60000",
                  "bgp.bfd_tx_ms: 70000 is out of range", "bgp.bfd_multiplier: 1 is out of range",
                  "bgp.hold_s: 2", "bgp.neighbor[1].address: 10.99.0.1 duplicates bgp.neighbor[0]",
                  "bgp.neighbor[2].asn: 4294967295 is out of range",
                  "bgp.neighbor[2].password: must be 1..80", "bgp.vip[0].address: 10.1.1.1 is not",
                  "bgp.communities[0]: \"70000:1\" is not a community"):
        assert field in text, (field, text)


def test_missing_and_conflicting():
    d = base()
    d["bgp"] = {"neighbor": []}
    text = "\n".join(errors(d))
    assert "bgp.asn: required" in text and "bgp.router_id: required" in text
    assert "bgp.neighbor: required" in text
    d = base(keepalive_s=9, hold_s=9)
    assert any(e.startswith("bgp.keepalive_s: 9 must be below hold_s") for e in errors(d))
    d = base(unknown=1)
    assert any(e.startswith("bgp.unknown: unknown key") for e in errors(d))
    d = base()
    d["vrrp"] = [{"name": "VI_1", "interface": "eth0", "vrid": 1, "priority": 100,
                  "vips": ["10.99.0.100/24"]}]
    assert any(e.startswith("bgp: ECMP mode") for e in errors(d))


def test_frr_missing_named(tmp_path):
    cfg = config_from_dict(base(vtysh=str(tmp_path / "no-vtysh")))
    (msg,) = check_bgp_system(cfg.bgp)
    assert "FRR is not installed" in msg and "apt-get install frr" in msg


def test_node_config_text():
    cfg = config_from_dict(base(
        neighbor=[{"address": "10.99.0.1", "asn": 65000, "password": "s3cret"},
                  {"address": "fd99::1", "asn": 65000, "bfd": False}],
        vip=[{"address": "fd99:200::100", "communities": ["65001:6"], "med": 3}],
        bfd_rx_ms=100, keepalive_s=1, hold_s=3))
    text = frr.node_config(cfg.bgp, "lb1")
    assert "router bgp 65001\n bgp router-id 10.99.0.21\n" in text
    assert " timers bgp 1 3\n" in text
    assert " neighbor 10.99.0.1 password s3cret\n" in text
    assert " neighbor 10.99.0.1 bfd profile l4lb\n" in text
    assert "neighbor fd99::1 bfd" not in text  # bfd = false on that neighbour
    assert "ipv6 prefix-list L4LB-VIP-10 seq 5 permit fd99:200::100/128" in text
    assert " set community 65001:6\n set metric 3\n" in text
    # each neighbour carries its own family; announcements are kernel routes via lo only
    v4 = text.split(" address-family ipv4 unicast")[1].split("exit-address-family")[0]
    v6 = text.split(" address-family ipv6 unicast")[1].split("exit-address-family")[0]
    assert "neighbor 10.99.0.1 activate" in v4 and "fd99::1" not in v4
    assert "neighbor fd99::1 activate" in v6 and "10.99.0.1" not in v6
    assert "redistribute kernel route-map L4LB-VIPS" in v4 and "route-map L4LB-VIPS" in v6
    assert text.count("match interface lo") == 2
    assert "receive-interval 100" in text


def test_router_config_multipath():
    text = frr.router_config(65000, "10.99.0.1", [frr.RouterPeer("10.99.0.21", 65001),
                                                   frr.RouterPeer("fd99::21", 65001, "pw")])
    assert text.count("maximum-paths 16") == 2 and "multipath-relax" in text
    assert " neighbor fd99::21 password pw\n" in text


NEIGHBORS = {
    "10.99.0.1": {"remoteAs": 65000, "bgpState": "Established", "bgpTimerUpMsec": 12000,
                  "connectionsEstablished": 2, "connectionsDropped": 1,
                  "addressFamilyInfo": {"ipv4Unicast": {"sentPrefixCounter": 2}}},
    "10.99.0.2": {"remoteAs": 65002, "bgpState": "Active", "connectionsEstablished": 0,
                  "connectionsDropped": 0, "lastNotificationReason": "OPEN Message Error/Bad Peer AS",
                  "lastErrorCodeSubcode": "020200"},
}


def test_parse_neighbors_and_bfd():
    s = frr.parse_neighbors(NEIGHBORS, [{"peer": "10.99.0.1", "status": "up"}])
    assert s["10.99.0.1"].up and s["10.99.0.1"].prefixes_sent == 2
    assert s["10.99.0.1"].uptime_s == 12.0 and s["10.99.0.1"].bfd == "up"
    assert not s["10.99.0.2"].up and s["10.99.0.2"].reason.endswith("Bad Peer AS")
    assert frr.parse_neighbors({"not-an-ip": {}, "10.0.0.9": "junk"}) == {}
    with pytest.raises(frr.FrrError, match="not JSON"):
        frr.parse_json("% Unknown command", "show bgp neighbors json")
    assert frr.parse_version("FRRouting 8.4.4 (vm) on Linux(6.18).\nCopyright") == "FRRouting 8.4.4"


class V:
    def __init__(self, address, reals):
        self.address, self.key, self.reals = address, f"{address}:80/tcp", reals


class R:
    def __init__(self, address, weight=1):
        self.address, self.weight = address, weight


def test_servable_needs_data_plane_and_a_live_real():
    vips = [V("10.99.200.100", [R("10.99.0.31"), R("10.99.0.32", 0)]),
            V("fd99:200:0::100", [R("fd99::31")])]
    up = {("10.99.200.100:80/tcp", "10.99.0.32"), ("fd99:200:0::100:80/tcp", "fd99::31")}
    is_up = lambda k, a: (k, a) in up  # noqa: E731
    # .32 is up but has weight 0: the v4 VIP has nothing to serve with
    assert announce.servable(vips, is_up, attached=True) == {"fd99:200::100"}
    assert announce.servable(vips, is_up, attached=False) == set()
    up.add(("10.99.200.100:80/tcp", "10.99.0.31"))
    assert announce.servable(vips, is_up, True) == {"10.99.200.100", "fd99:200::100"}


def test_announcer_gates():
    a = announce.Announcer(["10.0.0.1"])  # left by the previous run
    # before the join nothing new is announced, and what was there stays
    assert a.plan({"10.0.0.1", "10.0.0.2"}, joined=False, draining=False) == ([], [])
    assert a.plan(set(), joined=False, draining=False) == ([], ["10.0.0.1"])
    assert a.plan({"10.0.0.1", "10.0.0.2"}, joined=True, draining=False) == (["10.0.0.2"], [])
    a.done(["10.0.0.2"], [])
    assert a.plan({"10.0.0.1", "10.0.0.2"}, joined=True, draining=True) == \
        ([], ["10.0.0.1", "10.0.0.2"])
    a.done([], ["10.0.0.1", "10.0.0.2"])
    assert a.counters == {"announcements": 1, "withdrawals": 2}


def test_join_gate():
    peers = [{"name": "lb2", "address": "10.99.0.22:9542", "state": "up", "full_complete": 0},
             {"name": None, "address": "10.99.0.23:9542", "state": "unknown", "full_complete": 0}]
    st = {"peer_detail": peers}
    assert service.join_state(None, 0, 15) == (True, "no sync configured")
    assert service.join_state(st, 1.0, 15)[0] is False  # peers get a hello's time to show
    ok, why = service.join_state(st, 3.0, 15)
    assert not ok and "lb2" in why
    peers[0]["full_complete"] = 1
    ok, why = service.join_state(st, 3.0, 15)
    assert ok and "full walks received from lb2" in why
    peers[0]["full_complete"] = 0
    assert service.join_state(st, 15.0, 15) == (True, "join timeout (15s) passed")
    assert service.join_state({"peer_detail": peers[1:]}, 3.0, 15) == (True, "no sync peer is up")


def test_session_watch_logs_reasons_and_counts_flaps(monkeypatch, caplog):
    import asyncio
    import logging

    cfg = config_from_dict(base())
    now = [100.0]
    answers = []

    async def fake_sessions(bgp):
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return frr.parse_neighbors(a)

    monkeypatch.setattr(frr, "sessions", fake_sessions)
    r = service.Routing(cfg.bgp, servable=set, clock=lambda: now[0])
    refused = {"10.99.0.1": {"bgpState": "Idle", "remoteAs": 65000,
                             "lastNotificationReason": "OPEN Message Error/Bad Peer AS"}}
    silent = {"10.99.0.1": {"bgpState": "Connect", "remoteAs": 65000,
                            "lastResetDueTo": "Waiting for peer OPEN"}}
    up = {"10.99.0.1": {"bgpState": "Established", "remoteAs": 65000}}
    caplog.set_level(logging.INFO, logger="l4lb.routing")

    async def run():
        for a, dt in ((refused, 0), (refused, 2), (silent, 2), (silent, 10), (up, 1),
                      (silent, 1), (frr.FrrError("FRR is not running"), 1), (up, 1)):
            now[0] += dt
            answers.append(a)
            await r.poll()

    asyncio.run(run())
    text = caplog.text
    assert text.count("Bad Peer AS): refused: check bgp.asn (65001)") == 1  # once per cause
    assert text.count("bgp.neighbor password") == 1  # silent: only once stuck for STUCK_S
    assert "BGP session to 10.99.0.1 (AS 65000) established" in text
    assert "BGP session to 10.99.0.1 lost" in text and "FRR is not running" in text
    assert "FRR answers again" in text
    assert r.flaps["10.99.0.1"] == 1 and r.frr_up
    st = r.status()
    assert st["sessions"][0]["state"] == "Established" and st["sessions"][0]["flaps"] == 1


def test_frr_not_running_said_at_check():
    import asyncio
    import shutil

    from l4lb.routing.node import check_frr

    cfg = config_from_dict(base(frr_pathspace="h8-no-such-frr"))
    msg = asyncio.run(check_frr(cfg.bgp))
    if shutil.which("vtysh"):
        assert msg.startswith("bgp: FRR is not running (pathspace h8-no-such-frr)"), msg
    else:
        assert msg.startswith("bgp: FRR is not installed"), msg
    assert "apt-get install frr" in msg


def test_bgpd_not_answering_said_at_check(monkeypatch):
    """zebra answers `show version` but bgpd is down: vtysh prints a line, not JSON."""
    import asyncio

    from l4lb.routing.node import check_frr

    async def fake_vtysh(bgp, *commands, timeout=5.0):
        return "FRRouting 8.4.4 (vm)\n" if commands == ("show version",) else \
            "bgpd is not running\n"

    monkeypatch.setattr(frr, "vtysh", fake_vtysh)
    msg = asyncio.run(check_frr(config_from_dict(base()).bgp))
    assert msg.startswith("bgp: FRR runs but bgpd does not answer") and "bgpd=yes" in msg, msg
