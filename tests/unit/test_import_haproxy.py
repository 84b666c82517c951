"""haproxy.cfg -> l4lb VIPs: binds, servers, balance, health checks, and the layer-7 report."""

from __future__ import annotations

from pathlib import Path

import pytest

from l4lb.importer import CHANGED, UNSUPPORTED, ImportFailed, Options, import_files
from l4lb.importer.haconvert import parse_time

CFG = r"""global
    daemon
defaults
    mode tcp
    timeout connect 1s
    timeout check 500ms
    default-server inter 3s fall 4
listen db
    bind 10.0.0.1:5432,10.0.0.2:5432
    balance leastconn
    server a 10.0.1.1:5432 check weight 20
    server b 10.0.1.2 check weight 10 disabled
    server c 10.0.1.3:5432 check backup
    server d db4.example.com:5432 check
frontend web
    mode http
    bind [fd00::1]:8000-8001 ssl crt /etc/ssl/site.pem
    acl api path_beg /api
    use_backend api if api
    default_backend www
backend www
    mode http
    balance source
    option httpchk GET /healthz HTTP/1.1\r\nHost:\ www.example.test
    http-check expect status 204
    server w1 [fd00::11]:8080 check port 9000 rise 1
    server w2 fd00::12 check inter 10s
backend api
    mode http
    server x 10.9.9.9:80
"""


@pytest.fixture()
def res(tmp_path: Path):
    p = tmp_path / "haproxy.cfg"
    p.write_text(CFG)
    return import_files([str(p)], Options(node="lb1", interfaces=["ens3"]), root=tmp_path)


def lines(res, kind):
    return {f.loc.line for f in res.report.findings if f.kind == kind and f.loc}


def test_vips_and_reals(res):
    cfg = res.config
    assert cfg.node.interfaces == ("ens3",)
    assert [v.key for v in cfg.vips] == ["10.0.0.1:5432/tcp", "10.0.0.2:5432/tcp", "[fd00::1]:8000/tcp",
                                         "[fd00::1]:8001/tcp"]
    db = cfg.vips[0]
    assert db.hash == "5tuple" and db.mode == "dr"
    assert [(str(r.address), r.weight) for r in db.reals] == [("10.0.1.1", 20), ("10.0.1.2", 0)]
    hc = db.reals[0].healthcheck
    assert (hc.type, hc.port, hc.interval_s, hc.timeout_s, hc.rise, hc.fall) == ("tcp", 5432, 3.0, 0.5, 2, 4)
    web = cfg.vips[2]
    assert web.hash == "source"
    w1, w2 = web.reals
    assert (w1.healthcheck.type, w1.healthcheck.port, w1.healthcheck.http_path) == ("http", 9000, "/healthz")
    assert (w1.healthcheck.http_host, w1.healthcheck.http_expect_status, w1.healthcheck.rise) == (
        "www.example.test", 204, 1)
    assert (w2.healthcheck.interval_s, w2.healthcheck.port) == (10.0, 8000)  # no port: the VIP's


def test_report(res):
    changed, dropped = lines(res, CHANGED), lines(res, UNSUPPORTED)
    assert {2, 13, 14, 18, 28} <= dropped  # daemon, backup server, hostname, acl, backend api
    assert {10, 12, 16, 17, 19, 23, 26} <= changed  # leastconn, disabled, mode http, ssl, use_backend, source, port
    backup = [f for f in res.report.findings if f.loc and f.loc.line == 13]
    assert "no backup servers" in backup[0].message


def test_wildcard_bind_needs_a_vip(tmp_path):
    p = tmp_path / "h.cfg"
    p.write_text("frontend f\n    bind :80\n    default_backend b\nbackend b\n    server s 10.0.0.5:80 check\n")
    res = import_files([str(p)], Options(node="lb1"), root=tmp_path)
    assert res.config.vips == ()
    assert any(f.loc.line == 2 and "--vip" in f.message for f in res.report.findings if f.loc)
    res = import_files([str(p)], Options(node="lb1", vips=["10.0.0.100"]), root=tmp_path)
    assert [v.key for v in res.config.vips] == ["10.0.0.100:80/tcp"]


def test_undefined_backend_is_an_error(tmp_path):
    p = tmp_path / "h.cfg"
    p.write_text("frontend f\n    bind 10.0.0.1:80\n    default_backend nope\n")
    with pytest.raises(ImportFailed, match=r"h.cfg:3: backend 'nope' is not defined"):
        import_files([str(p)], Options(node="lb1"), root=tmp_path)


def test_times():
    assert parse_time("5000") == 5.0 and parse_time("2s") == 2.0 and parse_time("100ms") == 0.1
    assert parse_time("1m") == 60.0 and parse_time("x") is None
