"""keepalived grammar (includes, @conditions, $parameters, quotes, comments, braces) and its mapping to l4lb."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from l4lb.importer import CHANGED, NOTE, UNSUPPORTED, Options, import_files
from l4lb.importer.keepalived import parse_file, split_words
from l4lb.importer.report import Loc, Report


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def conv(tmp_path: Path, text: str, **opts):
    return import_files([str(write(tmp_path, "keepalived.conf", text))], Options(**opts), root=tmp_path)


def findings(res, kind=None):
    return [(f.loc.line if f.loc else None, f.directive) for f in res.report.sorted()
            if kind is None or f.kind == kind]


INST = """vrrp_instance VI_1 {{
    interface eth0
    virtual_router_id 51
    {extra}
    virtual_ipaddress {{
        10.0.0.100/24
    }}
}}
"""


def test_words_quotes_and_comments():
    rep = Report()
    loc = Loc("f", 1)
    assert split_words('abcd" efg h jkl "mnop', loc, rep) == (["abcd efg h jkl mnop"], [True])
    assert split_words('script "bash -c \'x y\'" # comment', loc, rep)[0] == ["script", "bash -c 'x y'"]
    assert split_words("auth_pass 'a!b#c' ! comment", loc, rep)[0] == ["auth_pass", "a!b#c"]
    assert split_words("track_script{chk}", loc, rep)[0] == ["track_script", "{", "chk", "}"]
    assert split_words('say "a \\" b"', loc, rep)[0] == ["say", 'a " b']
    assert rep.errors == []


def test_braces_on_the_next_line_and_one_line_blocks(tmp_path):
    text = """vrrp_script chk
{
    script "/bin/true"
    weight -10
}
vrrp_instance VI_1
{
    interface eth0 ! the VRRP link
    virtual_router_id 7   # any vrid
    track_script { chk }
    virtual_ipaddress { 10.0.0.100/24 }
}
"""
    res = conv(tmp_path, text)
    (inst,) = res.config.vrrp
    assert inst.vrid == 7 and inst.vips == (ipaddress.ip_interface("10.0.0.100/24"),)
    assert [(t.script, t.weight) for t in inst.track_scripts] == [(("/bin/true",), -10)]


def test_include_glob_relative_to_the_including_file(tmp_path):
    write(tmp_path, "conf.d/10-script.conf", 'vrrp_script chk {\n  script "/bin/true"\n  weight 5\n}\n')
    write(tmp_path, "conf.d/20-inst.conf", "include ../inst/vi1.conf\n")
    write(tmp_path, "inst/vi1.conf", INST.format(extra="track_script {\n chk\n }\n smtp_alert"))
    res = conv(tmp_path, "include conf.d/*.conf\n")
    (inst,) = res.config.vrrp
    assert inst.track_scripts[0].weight == 5
    # report lines name the included file and its own line
    smtp = [f for f in res.report.findings if f.directive == "smtp_alert"]
    assert [str(f.loc) for f in smtp] == ["inst/vi1.conf:7"]


def test_conditional_lines(tmp_path):
    text = INST.format(extra="@lb1 priority 150\n    @lb2 priority 50\n    @^lb1 nopreempt")
    lb1 = conv(tmp_path, text, node="lb1").config.vrrp[0]
    assert (lb1.priority, lb1.preempt) == (150, True)
    lb2 = conv(tmp_path, text, node="x", config_id="lb2").config.vrrp[0]
    assert (lb2.priority, lb2.preempt) == (50, False)
    res = conv(tmp_path, text)  # no id: only @^ lines apply
    assert (res.config.vrrp[0].priority, res.config.vrrp[0].preempt) == (100, False)
    assert [(line, d) for line, d in findings(res, NOTE) if d.startswith("@")] == [(4, "@lb1"), (5, "@lb2")]


def test_parameters(tmp_path):
    text = """$PRIO=120
$BASE=10.0.${SUB}
$SUB=7
$IFACE=eth1
$VIPS= \\
   10.0.7.100/24 \\
   10.0.7.101/24
vrrp_instance VI_1 {
    interface $IFACE
    virtual_router_id 9
    priority $PRIO
    unicast_src_ip ${BASE}.2
    unicast_peer {
        ${BASE}.3
    }
    virtual_ipaddress {
        $VIPS
    }
}
"""
    (inst,) = conv(tmp_path, text).config.vrrp
    assert inst.interface == "eth1" and inst.priority == 120
    assert str(inst.unicast_src) == "10.0.7.2" and [str(a) for a in inst.unicast_peers] == ["10.0.7.3"]
    assert [v.with_prefixlen for v in inst.vips] == ["10.0.7.100/24", "10.0.7.101/24"]


def test_self_referencing_parameter_is_an_error(tmp_path):
    rep = Report()
    p = write(tmp_path, "k.conf", "$A=x $A\n" + INST.format(extra="$A"))
    try:
        parse_file(p, rep)
    except Exception as e:  # ImportFailed
        assert "k.conf:5: parameter substitution nests deeper" in str(e)
    else:
        raise AssertionError("no error")


def test_vrrp_mapping(tmp_path):
    text = """global_defs {
    router_id lb-a.example
    vrrp_garp_master_repeat 3
}
vrrp_instance VI_1 {
    state MASTER
    interface eth0
    virtual_router_id 51
    priority 150
    advert_int 1.5
    nopreempt
    preempt_delay 30
    authentication {
        auth_type PASS
        auth_pass longerthan8
    }
    unicast_src_ip 10.0.0.2
    unicast_peer {
        10.0.0.3
    }
    virtual_ipaddress {
        10.0.0.100/24 dev eth1 label eth1:vip
        fd00::100/64
    }
    track_interface {
        eth1 weight -60
        eth2
    }
    notify_master "/usr/local/bin/notify master"
    notify "/usr/local/bin/notify-all x"
    notify_fault "echo fault > /tmp/f"
}
"""
    res = conv(tmp_path, text)
    cfg = res.config
    assert cfg.node.name == "lb-a_example"
    (inst,) = cfg.vrrp
    assert (inst.priority, inst.version, inst.advert_interval_s) == (150, 2, 2.0)  # v2: whole seconds
    assert (inst.preempt, inst.preempt_delay_s, inst.garp_count) == (False, 30.0, 3)
    assert inst.auth_pass == "longerth"
    assert str(inst.unicast_src) == "10.0.0.2" and [str(a) for a in inst.unicast_peers] == ["10.0.0.3"]
    assert [v.with_prefixlen for v in inst.vips] == ["10.0.0.100/24"]
    assert [(t.name, t.weight) for t in inst.track_interfaces] == [("eth1", -60), ("eth2", 0)]
    assert inst.notify_master == ("/usr/local/bin/notify", "master")
    assert inst.notify == ("/usr/local/bin/notify-all", "x")
    assert inst.notify_fault == ("/bin/sh", "-c", "echo fault > /tmp/f")
    got = findings(res)
    for expect in [(2, "router_id"), (6, "state"), (10, "advert_int"), (15, "auth_pass"), (22, "label"),
                   (22, "dev"), (23, "virtual_ipaddress"), (29, "notify_master"), (31, "notify_fault")]:
        assert expect in got, (expect, got)


def test_ipv6_instance_is_v3_and_v3_drops_auth(tmp_path):
    text = INST.format(extra="advert_int 0.255\n authentication {\n auth_type AH\n auth_pass x\n }").replace(
        "10.0.0.100/24", "fd00::100/64")
    res = conv(tmp_path, text)
    (inst,) = res.config.vrrp
    assert inst.version == 3 and inst.advert_interval_s == 0.26 and inst.auth_pass is None
    assert (6, "auth_type") in findings(res, UNSUPPORTED)


def test_track_script_weights_and_reverse(tmp_path):
    text = """vrrp_script up {
    script "/bin/true"
    weight 10
}
vrrp_script down {
    script "/bin/false"
    weight -20
    fall 3
}
""" + INST.format(extra="track_script {\n up\n down weight -30\n up weight 5 reverse\n missing\n }")
    res = conv(tmp_path, text)
    ts = res.config.vrrp[0].track_scripts
    assert [(t.script, t.weight, t.fall) for t in ts] == [(("/bin/true",), 10, 1), (("/bin/false",), -30, 3)]
    assert (16, "reverse") in findings(res, UNSUPPORTED) and (17, "track_script") in findings(res, UNSUPPORTED)
    assert "priority 100; with tracks 70..110" in res.text


def test_lvs_sync_daemon_with_unicast_peers(tmp_path):
    text = "global_defs {\n lvs_sync_daemon eth0 VI_1 id 5\n}\n" + INST.format(
        extra="unicast_src_ip 10.0.0.2\n unicast_peer {\n 10.0.0.3\n }")
    res = conv(tmp_path, text)
    s = res.config.sync
    assert s.enabled and str(s.listen) == "10.0.0.2:9542" and [str(p) for p in s.peers] == ["10.0.0.3:9542"]
    assert s.key_file == "/etc/l4lb/sync.key" and s.vrrp_instance == "VI_1"
    assert (2, "lvs_sync_daemon") in findings(res, UNSUPPORTED)  # the id option


def test_virtual_servers(tmp_path):
    text = """virtual_server_group G {
    10.0.0.10-12 80
    fd00::a-b 80
    fwmark 3
}
virtual_server group G {
    lb_algo wlc
    lb_kind TUN
    protocol TCP
    delay_loop 10
    real_server 10.0.1.1 80 {
        weight 3
        HTTP_GET {
            url {
                path /health
                status_code 204
            }
            connect_timeout 20
        }
    }
    real_server 10.0.1.2 8080 {
        weight 0
        MISC_CHECK {
            misc_path "/usr/local/bin/chk --real 10.0.1.2"
            misc_timeout 4
        }
    }
}
virtual_server 10.0.0.20 53 {
    lb_algo rr
    lb_kind DR
    protocol UDP
    persistence_timeout 300
    real_server 10.0.1.3 53 {
        weight 5
        UDP_CHECK {
            connect_timeout 1
        }
    }
    real_server 10.0.1.4 53 {
        weight 9
    }
}
virtual_server fwmark 1 {
    real_server 10.0.1.5 80 {
    }
}
"""
    res = conv(tmp_path, text)
    keys = [v.key for v in res.config.vips]
    assert keys == ["10.0.0.10:80/tcp", "10.0.0.11:80/tcp", "10.0.0.12:80/tcp", "[fd00::a]:80/tcp",
                    "[fd00::b]:80/tcp", "10.0.0.20:53/udp"]
    v4 = res.config.vips[0]
    assert v4.mode == "tun" and v4.hash == "5tuple"
    r1, r2 = v4.reals
    assert (r1.weight, r1.healthcheck.type, r1.healthcheck.http_path, r1.healthcheck.http_expect_status) == (
        3, "http", "/health", 204)
    assert (r1.healthcheck.interval_s, r1.healthcheck.timeout_s, r1.healthcheck.fall) == (10.0, 10.0, 2)
    assert (r2.weight, r2.healthcheck.type, r2.healthcheck.script, r2.healthcheck.timeout_s) == (
        0, "script", ("/usr/local/bin/chk", "--real", "10.0.1.2"), 4.0)
    assert r2.healthcheck.port == 8080  # keepalived checks the real's own port
    v6 = res.config.vips[3]
    assert [str(r.address) for r in v6.reals] == ["10.0.1.1", "10.0.1.2"]  # tun carries IPv4 reals
    udp = res.config.vips[5]
    assert udp.hash == "source" and udp.mode == "dr"
    assert [(r.weight, r.healthcheck.type) for r in udp.reals] == [(1, "none"), (1, "none")]  # rr: equal
    got = findings(res)
    for expect in [(4, "fwmark"), (7, "lb_algo"), (21, "real_server"), (30, "lb_algo"), (33, "persistence_timeout"),
                   (36, "UDP_CHECK"), (44, "virtual_server")]:
        assert expect in got, (expect, got)
    assert any(k == CHANGED and d == "lb_algo" for k, d in [(f.kind, f.directive) for f in res.report.findings])


def test_script_security(tmp_path):
    script = 'vrrp_script chk {\n  script "/bin/true"\n}\n'
    inst = INST.format(extra="track_script {\n chk\n }")
    res = conv(tmp_path, "global_defs {\n  enable_script_security\n}\n" + script + inst)
    assert res.config.node.script_security is True
    assert "script_security = true  # enable_script_security (keepalived.conf:2)" in res.text
    assert not [f for f in res.report.findings if f.directive == "script_security"]
    res = conv(tmp_path, script + inst)  # keepalived ran it regardless; l4lb checks: reported
    assert [f.kind for f in res.report.findings if f.directive == "script_security"] == [CHANGED]
    res = conv(tmp_path, INST.format(extra=""))  # no scripts, nothing to say
    assert not [f for f in res.report.findings if f.directive == "script_security"]
