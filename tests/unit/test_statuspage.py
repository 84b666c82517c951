"""The status page without BPF: rates from counter deltas, ring shares, the
status.json document, HTML rendering (escaping, CSP, nothing external), query
limits, the snapshot cache, and the HTTP answers of the metrics listener over the
fake daemon of test_metrics_render."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from test_metrics_render import (  # a sibling: pytest puts tests/unit on the path
    _listen,
    fake_daemon,
)

from l4lb import maglev, metrics, statuspage
from l4lb.statuspage import BadRequest, RateMeter, ShareCache

VIP = "10.99.0.100:80/tcp"


def ready_daemon():
    """fake_daemon, ready, with the rings a running daemon would have published."""
    d = fake_daemon()
    d.ready = True
    d.tables._last_ring = {}
    for key, vs in d.tables.vips.items():
        live = [maglev.Backend(r.real_id, r.address, r.weight) for r in vs.reals.values()]
        d.tables._last_ring[key] = maglev.build_ring(live, 251)
    return d


# ------------------------------------------------------------------ rates
def test_rates_are_deltas_over_the_window():
    m = RateMeter(window_s=1.0)
    assert m.update(100.0, {("a",): (10, 1)}) == {}  # one sample: no rate yet
    assert m.update(100.5, {("a",): (20, 2)}) == {}  # too soon: still none
    r = m.update(102.0, {("a",): (410, 21), ("b",): (5, 5)})
    assert r == {("a",): (200.0, 10.0), ("b",): None}  # b is new: no rate yet
    assert m.window == 2.0
    assert m.update(102.2, {("a",): (500, 30)}) is r  # inside the window: the last rates
    # a counter that went backwards (VIP re-added) has no rate, the others go on
    r = m.update(103.0, {("a",): (3, 0), ("b",): (15, 9)})
    assert r == {("a",): None, ("b",): (10.0, 4.0)}


# ------------------------------------------------------------- ring share
def test_ring_shares_follow_the_weights_and_are_counted_once_per_ring():
    ring = maglev.build_ring([maglev.Backend(1, "a", 100), maglev.Backend(2, "b", 300),
                              maglev.Backend(3, "c", 0)], 65537)
    c = ShareCache()
    s = c.shares("v", ring)
    assert set(s) == {1, 2}  # weight 0: no entries
    assert sum(s.values()) == pytest.approx(1.0)
    assert s[2] / s[1] == pytest.approx(3.0, rel=0.02)
    assert s == {k: n / 65537 for k, n in maglev.ring_shares(ring).items()}
    assert c.shares("v", ring) is s  # the same ring object: not counted again
    ring2 = maglev.build_ring([maglev.Backend(1, "a", 100)], 65537)
    assert c.shares("v", ring2) == {1: 1.0}
    assert c.shares("v", None) == {}
    assert c.shares("w", [0] * 7) == {}  # every entry NO_REAL: nobody has a share


# --------------------------------------------------------------- snapshot
def real(address, up=True, weight=100, in_ring=True, rid=1):
    return {"address": address, "up": up, "weight": weight, "in_ring": in_ring, "id": rid,
            "health": "tcp", "last_check": "ok" if up else "connection refused"}


def test_real_states():
    assert statuspage.real_state(real("a")) == "UP"
    assert statuspage.real_state(real("a", up=False, in_ring=False)) == "DOWN"
    assert statuspage.real_state(real("a", up=False, weight=0, in_ring=False)) == "DOWN"
    assert statuspage.real_state(real("a", weight=0, in_ring=False)) == "DRAIN"
    assert statuspage.real_state(real("a", in_ring=False)) == "NO MAC"


def test_compose_joins_status_stats_shares_rates_and_census():
    census = metrics.ConnCensus(total=9, by_vip={0: 7}, by_real={1: 4, 2: 3})
    status = {"node": "lb1", "uptime_s": 3.0, "vips": [
        {"vip": VIP, "id": 0, "mode": "dr", "hash": "5tuple", "ring_size": 251,
         "reals": [real("10.0.0.1", rid=1), real("10.0.0.2", up=False, in_ring=False, rid=2),
                   real("10.0.0.3", rid=None)]}],
        "vrrp": [{"name": "VI_1", "state": "master", "priority": 150, "vrid": 51,
                  "interface": "eth0", "master_address": "10.0.0.9", "vips_held": True,
                  "counters": {}}],
        "sync": {"role": "master", "state": "connected", "peers": "x", "lag_ms": 1.5,
                 "max_lag_ms": 9.0, "entries_sent": 5, "entries_received": 0,
                 "entries_installed": 0, "rejected": {}}}
    stats = {"vips": [{"vip": VIP, "packets": 100, "bytes": 1, "new_flows": 10, "reals": [
        {"address": "10.0.0.1", "packets": 60, "bytes": 1, "new_flows": 6},
        {"address": "10.0.0.2", "packets": 40, "bytes": 1, "new_flows": 4}]}]}
    snap = statuspage.compose(
        status, stats, census=census, shares={VIP: {1: 0.5, 2: 0.25}},
        rates={(VIP,): (12.34, 1.0), (VIP, "10.0.0.1"): (12.34, 1.0), (VIP, "10.0.0.2"): None},
        rate_window_s=1.23456, capacity=65536, now=5.0)
    json.dumps(snap)  # what /status.json sends
    v = snap["vips"][0]
    assert (v["packets_per_s"], v["new_flows_per_s"], v["conn_entries"]) == (12.3, 1.0, 7)
    assert v["reals_up"] == 2
    r1, r2, r3 = v["reals"]
    assert (r1["state"], r1["ring_share"], r1["packets_per_s"], r1["conn_entries"],
            r1["packets"]) == ("UP", 0.5, 12.3, 4, 60)
    assert (r2["state"], r2["ring_share"], r2["packets_per_s"], r2["conn_entries"],
            r2["last_check"]) == ("DOWN", 0.25, None, 3, "connection refused")
    assert (r3["ring_share"], r3["packets"], r3["conn_entries"]) == (0.0, None, None)
    assert snap["vrrp"] == [{"name": "VI_1", "state": "master", "priority": 150, "vrid": 51,
                             "interface": "eth0", "master_address": "10.0.0.9",
                             "vips_held": True}]
    assert snap["sync"]["lag_ms"] == 1.5 and "rejected" not in snap["sync"]
    assert snap["conn_table"]["entries"] == 9 and snap["rate_window_s"] == 1.23
    # a census without per-id counts (no batch ops): totals only
    snap = statuspage.compose(status, stats, census=metrics.ConnCensus(total=3, per_id=False))
    assert snap["vips"][0]["conn_entries"] is None
    assert snap["vips"][0]["reals"][0]["conn_entries"] is None
    assert snap["vips"][0]["packets_per_s"] is None  # no rates yet


# -------------------------------------------------------------- rendering
def _snap_with(detail: str, node: str = "lb1") -> dict:
    status = {"node": node, "vips": [{"vip": VIP, "id": 0, "mode": "dr", "hash": "5tuple",
                                      "ring_size": 251, "reals": [real("10.0.0.1")]}]}
    status["vips"][0]["reals"][0]["last_check"] = detail
    return statuspage.compose(status, {"vips": []})


def test_html_escapes_everything_it_shows():
    evil = '<script>alert(1)</script>"&'
    page = statuspage.render_page(_snap_with(evil, node=evil), 1.0)
    assert evil not in page and "<script>alert" not in page
    # title, heading, node line, health-check detail
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&amp;") == 4
    assert page.count("<script>") == 1  # ours only


def test_page_is_self_contained_and_its_csp_admits_exactly_its_script_and_style():
    page = statuspage.render_page(_snap_with("ok"), 2.5)
    # nothing loaded from elsewhere: no src attributes, no external links
    assert not re.search(r"\bsrc\s*=", page)
    assert not re.search(r"(?:href|url)\s*[=(]\s*[\"']?(?:https?:)?//", page)
    assert '<body data-refresh="2.5">' in page and 'content="2.5"' in page
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert statuspage._sha256(script) in statuspage.CSP
    assert statuspage._sha256(style) in statuspage.CSP
    assert "default-src 'none'" in statuspage.CSP and "connect-src 'self'" in statuspage.CSP
    # the script fetches the fragment that render_main makes, and swaps it into #main
    assert 'fetch("/?fragment=1"' in script and '<div id="main">' in page
    row = re.search(r'<tr data-real="10.0.0.1">.*?</tr>', page, re.S).group(0)
    assert '<td class="l state UP">UP</td>' in row and "50.0%" not in row


def test_not_ready_renders_a_message():
    snap = statuspage.not_ready("lb1")
    assert "still loading" in statuspage.render_main(snap)
    json.dumps(snap)


@pytest.mark.parametrize("query", ["refresh=abc", "refresh=0", "refresh=0.1", "refresh=-1",
                                   "refresh=nan", "refresh=inf", "refresh=1e9", "refresh="])
def test_bad_refresh_is_refused_naming_the_parameter_and_limits(query):
    with pytest.raises(BadRequest, match=r"refresh=.*a number of seconds from 0.5 to 3600"):
        statuspage.parse_query(query.encode())


def test_queries():
    assert statuspage.parse_query(b"") == (False, statuspage.REFRESH_DEFAULT_S)
    assert statuspage.parse_query(b"fragment=1&refresh=0.5") == (True, 0.5)
    assert statuspage.parse_query(b"refresh=2&refresh=30") == (False, 30.0)  # the last one
    assert statuspage.parse_query(b"x=%ff&y") == (False, 1.0)  # unknown: ignored
    with pytest.raises(BadRequest, match="ASCII"):
        statuspage.parse_query("refresh=ü".encode())


# ------------------------------------------------ the page on a daemon
def test_snapshots_are_shared_within_their_age_and_rates_come_from_deltas():
    d = ready_daemon()
    page = statuspage.StatusPage(d, max_age_s=0.3)
    t = d.tables
    key = next(iter(t.vips))

    async def go():
        a = await asyncio.gather(*(page.snapshot() for _ in range(5)))
        assert all(s is a[0] for s in a) and page.snapshots == 1
        page.rates.window_s = 0.0  # every new snapshot computes rates
        await asyncio.sleep(0.35)
        t.counters[(key,)] = dict(t.counters[(key,)], packets=t.counters[(key,)]["packets"] + 50)
        return a[0], await page.snapshot()

    first, second = asyncio.run(go())
    assert page.snapshots == 2
    v1, v2 = first["vips"][0], second["vips"][0]
    assert v1["packets_per_s"] is None
    assert v2["packets_per_s"] == pytest.approx(50 / second["rate_window_s"], rel=0.05)
    assert v2["reals"][0]["packets_per_s"] == 0.0
    # ring shares of the published ring, by real id
    shares = {r["address"]: r["ring_share"] for r in v2["reals"]}
    assert shares == {"10.99.0.31": 1.0, "10.99.0.32": 0.0}  # .32 has weight 0
    # the census of the metrics (the same cache): 3 entries for VIP id 0
    assert v2["conn_entries"] == 3 and second["conn_table"]["entries"] == 4
    assert [r["state"] for r in v2["reals"]] == ["UP", "DOWN"]  # .32's check is down
    assert second["vrrp"][0]["state"] == "backup" and second["sync"]["role"] == "backup"


def _get(port: int, request: bytes) -> bytes:
    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request)
        out = await r.read()
        w.close()
        return out
    return go()


def test_http_answers_of_the_listener():
    async def go():
        d = ready_daemon()
        d.cfg = _listen(d.cfg, "127.0.0.1", 0)
        srv = await metrics.serve(d)
        port = srv.sockets[0].getsockname()[1]
        out = {}
        for name, req in {
            "page": b"GET /?refresh=2 HTTP/1.1\r\nHost: x\r\n\r\n",
            "frag": b"GET /?fragment=1 HTTP/1.0\r\n\r\n",
            "json": b"GET /status.json HTTP/1.0\r\n\r\n",
            "head": b"HEAD / HTTP/1.0\r\n\r\n",
            "bad": b"GET /?refresh=0 HTTP/1.0\r\n\r\n",
            "post": b"POST /status.json HTTP/1.0\r\n\r\n",
            "other": b"GET /index.html HTTP/1.0\r\n\r\n",
        }.items():
            out[name] = await _get(port, req)
        d.ready = False  # a daemon still loading: the page says so
        page_nr = statuspage.StatusPage(d)
        nr = await page_nr.handle(b"/status.json", b"")
        srv.close()
        return out, nr

    out, nr = asyncio.run(go())
    head, _, body = out["page"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"\r\nContent-Type: text/html; charset=utf-8\r\n" in head
    assert b"\r\nCache-Control: no-store\r\n" in head
    assert f"\r\nContent-Security-Policy: {statuspage.CSP}\r\n".encode() in head
    assert f"Content-Length: {len(body)}\r\n".encode() in head
    assert b'<body data-refresh="2">' in body and b"VIP 10.99.0.100:80/tcp" in body
    # VRRP state and the sync agent's state and lag (none measured yet: a dash)
    text = body.decode()
    assert re.search(r'<table id="vrrp">.*<td class="l">VI_1</td><td class="l backup">BACKUP'
                     r"</td><td>150</td><td>51</td>", text, re.S)
    assert re.search(r'<table id="sync">.*<td class="l">backup</td><td class="l">[a-z ]+</td>'
                     r"<td>\u2013</td><td>0.0 ms</td>", text, re.S)
    fhead, _, frag = out["frag"].partition(b"\r\n\r\n")
    assert not frag.startswith(b"<!DOCTYPE") and b'<tr data-real="10.99.0.31">' in frag
    jhead, _, jbody = out["json"].partition(b"\r\n\r\n")
    assert b"Content-Type: application/json\r\n" in jhead
    assert b"Content-Security-Policy" not in jhead
    snap = json.loads(jbody)
    assert snap["ready"] and [v["vip"] for v in snap["vips"]] == [VIP, "[fd99::100]:53/udp"]
    assert out["head"].startswith(b"HTTP/1.0 200") and out["head"].endswith(b"\r\n\r\n")
    assert out["bad"].startswith(b"HTTP/1.0 400") and b"refresh='0'" in out["bad"]
    assert out["post"].startswith(b"HTTP/1.0 405")
    assert out["other"].startswith(b"HTTP/1.0 404")
    assert nr.status == "200 OK" and json.loads(nr.body)["ready"] is False


def test_a_failing_status_is_a_500_and_the_server_lives_on():
    async def go():
        d = ready_daemon()
        d.cfg = _listen(d.cfg, "127.0.0.1", 0)
        srv = await metrics.serve(d)
        port = srv.sockets[0].getsockname()[1]
        good = d.status
        d.status = lambda: 1 / 0
        bad = await _get(port, b"GET /status.json HTTP/1.0\r\n\r\n")
        d.status = good
        ok = await _get(port, b"GET /status.json HTTP/1.0\r\n\r\n")
        srv.close()
        return bad, ok

    bad, ok = asyncio.run(go())
    assert bad.startswith(b"HTTP/1.0 500") and b"ZeroDivisionError" in bad
    assert ok.startswith(b"HTTP/1.0 200")
