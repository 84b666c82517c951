"""The live status page on the metrics listener: ``/`` (HTML) and ``/status.json``.

What an operator looks at (HAProxy's ``stats uri``): VIPs, their reals with health,
weight, ring share, packets/s and new flows/s, conn-table entries; VRRP state; sync
state and lag. Read-only (GET/HEAD), served where the metrics are, nothing external:
the page is one HTML document with its style and a ~20-line script inline, and a
Content-Security-Policy that lets it load nothing from anywhere (it works offline).

The script refreshes the page in place: every ``refresh`` seconds it fetches
``/?fragment=1`` (the same server-side rendering of the main part) and swaps it in,
so there is one renderer, and without JavaScript a <noscript> meta refresh does the
same by reloading.

Cost, bounded however many browsers look: one snapshot (status() and the per-VIP
and per-real counter maps, read on the loop as a scrape reads them) at most every
SNAPSHOT_MAX_AGE_S, shared by every request in that time; the conn-table counts come
from the metrics' census cache (a walk in a thread at most every 5 s, never per
request). Joining those, counting ring shares (once per published ring) and
rendering the HTML and JSON (once per snapshot) run in a thread. Rates are counter deltas between snapshots at least
RATE_WINDOW_S apart (server-side, so every viewer sees the same numbers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from l4lb import __version__

SNAPSHOT_MAX_AGE_S = 0.5  # requests within this share one snapshot
RATE_WINDOW_S = 1.0  # rates are deltas over at least this long
REFRESH_DEFAULT_S = 1.0
REFRESH_MIN_S, REFRESH_MAX_S = SNAPSHOT_MAX_AGE_S, 3600.0
PATHS = (b"/", b"/status.json")


class BadRequest(ValueError):
    """A query the page refuses; the message names the parameter and its limits."""


# ------------------------------------------------------------------- rates
class RateMeter:
    """Per-second rates of monotonic counters from two samples at least ``window_s``
    apart. ``update`` returns the latest rates: None for a key until two samples of
    it exist, or when its counter went backwards (a VIP or real deleted and re-added
    starts again from zero)."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._base: tuple[float, dict] | None = None
        self.rates: dict = {}
        self.window: float | None = None  # seconds the current rates span

    def update(self, now: float, counters: dict) -> dict:
        if self._base is None:
            self._base = (now, dict(counters))
            return self.rates
        t0, base = self._base
        dt = now - t0
        if dt < self.window_s:
            return self.rates
        rates = {}
        for key, vals in counters.items():
            old = base.get(key)
            if old is None or any(v < o for v, o in zip(vals, old, strict=True)):
                rates[key] = None
            else:
                rates[key] = tuple((v - o) / dt for v, o in zip(vals, old, strict=True))
        self._base, self.rates, self.window = (now, dict(counters)), rates, dt
        return rates


# ------------------------------------------------------------- ring share
class ShareCache:
    """Ring entries per real id as a fraction of the ring, counted once per ring."""

    def __init__(self):
        self._cache: dict[str, tuple[object, dict[int, float]]] = {}

    def shares(self, key: str, ring) -> dict[int, float]:
        if ring is None:
            return {}
        hit = self._cache.get(key)
        if hit is not None and hit[0] is ring:
            return hit[1]
        import numpy as np  # noqa: PLC0415 - a dependency of the tables already

        arr = np.frombuffer(ring, dtype=np.uint32) if not isinstance(ring, list) \
            else np.asarray(ring, dtype=np.uint32)
        ids, counts = np.unique(arr, return_counts=True)
        n = max(len(arr), 1)
        out = {int(i): int(c) / n for i, c in zip(ids, counts, strict=True) if i}
        self._cache[key] = (ring, out)
        return out


# --------------------------------------------------------------- snapshot
def real_state(r: dict) -> str:
    """UP (takes new flows), DOWN (fails its health check), DRAIN (weight 0), NO MAC
    (up, but its MAC is unknown, so out of the ring)."""
    if not r["up"]:
        return "DOWN"
    if r["weight"] == 0:
        return "DRAIN"
    return "UP" if r["in_ring"] else "NO MAC"


def compose(status: dict, stats: dict, *, census=None, shares=None, rates=None,
            rate_window_s=None, capacity=None, now=None) -> dict:
    """The status.json document from the daemon's status() and stats() (pure).

    ``census``: a metrics.ConnCensus or None; ``shares``: {vip key: {real id:
    fraction}}; ``rates``: {(vip key,) or (vip key, real): (packets/s, flows/s)|None}.
    """
    shares, rates = shares or {}, rates or {}
    counters = {v["vip"]: v for v in stats.get("vips", [])}
    per_id = census is not None and census.per_id

    def rate(key, i):
        r = rates.get(key)
        return None if r is None else round(r[i], 1)

    vips = []
    for v in status.get("vips", []):
        key = v["vip"]
        c = counters.get(key, {})
        creals = {r["address"]: r for r in c.get("reals", [])}
        sh = shares.get(key, {})
        reals = []
        for r in v["reals"]:
            rc = creals.get(r["address"], {})
            reals.append({
                "address": r["address"], "state": real_state(r), "up": r["up"],
                "weight": r["weight"], "in_ring": r["in_ring"], "health": r["health"],
                "last_check": r["last_check"],
                "ring_share": round(sh.get(r["id"], 0.0), 4) if r["id"] is not None else 0.0,
                "packets": rc.get("packets"), "new_flows": rc.get("new_flows"),
                "packets_per_s": rate((key, r["address"]), 0),
                "new_flows_per_s": rate((key, r["address"]), 1),
                "conn_entries": census.by_real.get(r["id"], 0) if per_id and r["id"] else None,
            })
        vips.append({
            "vip": key, "mode": v["mode"], "hash": v["hash"], "ring_size": v["ring_size"],
            "reals_up": sum(1 for r in reals if r["state"] == "UP"), "reals": reals,
            "packets": c.get("packets"), "new_flows": c.get("new_flows"),
            "packets_per_s": rate((key,), 0), "new_flows_per_s": rate((key,), 1),
            "conn_entries": census.by_vip.get(v.get("id"), 0) if per_id and "id" in v else None,
        })
    sync = status.get("sync")
    return {
        "node": status.get("node"), "version": __version__, "ready": True,
        "time": now if now is not None else time.time(), "uptime_s": status.get("uptime_s"),
        "rate_window_s": None if rate_window_s is None else round(rate_window_s, 2),
        "vips": vips,
        "vrrp": [{k: a.get(k) for k in ("name", "state", "priority", "vrid", "interface",
                                        "master_address", "vips_held")}
                 for a in status.get("vrrp") or []],
        "sync": None if sync is None else {k: sync.get(k) for k in (
            "role", "state", "peers", "lag_ms", "max_lag_ms", "entries_sent",
            "entries_received", "entries_installed")},
        "conn_table": {"entries": census.total if census is not None else None,
                       "capacity": capacity,
                       "census_age_s": None if census is None else
                       round(max(0.0, time.monotonic() - census.taken_at), 1)},
        "bgp": status.get("bgp"),
    }


def not_ready(node: str, now: float | None = None) -> dict:
    return {"node": node, "version": __version__, "ready": False,
            "time": now if now is not None else time.time(), "vips": [], "vrrp": [],
            "sync": None}


# --------------------------------------------------------------- rendering
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.3em 0}
th,td{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}
.UP{background:#c8f0c8}.DOWN{background:#f4b4b4;font-weight:bold}
.DRAIN,.NO-MAC{background:#f8e0a0}.master{background:#c8f0c8}.backup{background:#dde}
.fault{background:#f4b4b4}#note{color:#666}#note.stale{color:#b00;font-weight:bold}
"""

SCRIPT = """
(function () {
  var main = document.getElementById("main"), note = document.getElementById("note");
  var every = 1000 * Number(document.body.getAttribute("data-refresh"));
  function tick() {
    fetch("/?fragment=1", {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (text) {
      main.innerHTML = text;
      note.className = "";
      note.textContent = "live: refreshed " + new Date().toLocaleTimeString();
    }).catch(function (e) {
      note.className = "stale";
      note.textContent = "stale since " + new Date().toLocaleTimeString() + ": " + e.message;
    }).then(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# The page may run its own inline script and style, and fetch from where it came:
# nothing else, from anywhere (no CDN, no fonts, no images).
CSP = (f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _e(v) -> str:
    return html.escape("–" if v is None else str(v))


def _num(v, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}"
    return f"{v:,}{unit}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def render_main(snap: dict) -> str:
    """The live part of the page (what the script swaps in)."""
    if not snap.get("ready"):
        return "<p>The data plane is still loading: nothing to show yet.</p>"
    out = []
    ct = snap.get("conn_table") or {}
    out.append(f"<p>node <b>{_e(snap['node'])}</b> · up {_e(_num(snap.get('uptime_s'), ' s'))}"
               f" · conn table {_num(ct.get('entries'))} / {_num(ct.get('capacity'))}"
               f" (counted {_num(ct.get('census_age_s'), ' s')} ago)"
               f" · rates over {_num(snap.get('rate_window_s'), ' s')}</p>")
    if snap["vrrp"]:
        out.append('<h2>VRRP</h2><table id="vrrp"><tr><th class="l">instance</th>'
                   '<th class="l">state</th><th>priority</th><th>vrid</th>'
                   '<th class="l">interface</th><th class="l">master</th></tr>')
        for a in snap["vrrp"]:
            st = str(a.get("state"))
            out.append(f'<tr><td class="l">{_e(a["name"])}</td>'
                       f'<td class="l {_e(st)}">{_e(st.upper())}</td>'
                       f'<td>{_e(a["priority"])}</td><td>{_e(a["vrid"])}</td>'
                       f'<td class="l">{_e(a["interface"])}</td>'
                       f'<td class="l">{_e(a["master_address"])}</td></tr>')
        out.append("</table>")
    s = snap.get("sync")
    if s:
        out.append('<h2>Conn-table sync</h2><table id="sync"><tr><th class="l">role</th>'
                   '<th class="l">state</th><th>lag</th><th>max lag</th><th>sent</th>'
                   '<th>received</th><th>installed</th><th class="l">peers</th></tr>'
                   f'<tr><td class="l">{_e(s["role"])}</td><td class="l">{_e(s["state"])}</td>'
                   f'<td>{_num(s["lag_ms"], " ms")}</td><td>{_num(s["max_lag_ms"], " ms")}</td>'
                   f'<td>{_num(s["entries_sent"])}</td><td>{_num(s["entries_received"])}</td>'
                   f'<td>{_num(s["entries_installed"])}</td>'
                   f'<td class="l">{_e(s["peers"])}</td></tr></table>')
    for v in snap["vips"]:
        out.append(f'<h2>VIP {_e(v["vip"])}</h2>'
                   f'<p class="vip" data-vip="{_e(v["vip"])}">{_e(v["mode"])} mode, hash '
                   f'{_e(v["hash"])}, ring {_num(v["ring_size"])}'
                   f' · <span class="up">{v["reals_up"]}/{len(v["reals"])}</span> reals up'
                   f' · <span class="pps">{_num(v["packets_per_s"])}</span> packets/s'
                   f' · <span class="fps">{_num(v["new_flows_per_s"])}</span> new flows/s'
                   f' · <span class="conns">{_num(v["conn_entries"])}</span> conn entries</p>')
        out.append(f'<table class="reals" data-vip="{_e(v["vip"])}"><tr><th class="l">real</th>'
                   '<th class="l">state</th><th>weight</th><th>ring share</th>'
                   '<th>packets/s</th><th>new flows/s</th><th>conn entries</th>'
                   '<th>packets</th><th>new flows</th><th class="l">health check</th></tr>')
        for r in v["reals"]:
            cls = r["state"].replace(" ", "-")
            out.append(f'<tr data-real="{_e(r["address"])}"><td class="l">{_e(r["address"])}</td>'
                       f'<td class="l state {cls}">{_e(r["state"])}</td>'
                       f'<td>{_num(r["weight"])}</td><td>{_pct(r["ring_share"])}</td>'
                       f'<td>{_num(r["packets_per_s"])}</td>'
                       f'<td>{_num(r["new_flows_per_s"])}</td>'
                       f'<td>{_num(r["conn_entries"])}</td><td>{_num(r["packets"])}</td>'
                       f'<td>{_num(r["new_flows"])}</td>'
                       f'<td class="l">{_e(r["health"])}: {_e(r["last_check"])}</td></tr>')
        out.append("</table>")
    if not snap["vips"]:
        out.append("<p>No VIPs configured.</p>")
    return "\n".join(out)


def render_page(snap: dict, refresh: float) -> str:
    node = _e(snap.get("node"))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>l4lb {node}</title>"
            f'<noscript><meta http-equiv="refresh" content="{refresh:g}"></noscript>'
            f"<style>{STYLE}</style></head>\n"
            f'<body data-refresh="{refresh:g}"><h1>l4lb {node}</h1>'
            f'<p><span id="note">refreshed every {refresh:g} s</span> · '
            f'<a href="/status.json">status.json</a> · <a href="/metrics">metrics</a> · '
            f"l4lb {_e(__version__)}</p>\n"
            f'<div id="main">{render_main(snap)}</div>\n'
            f"<script>{SCRIPT}</script></body></html>\n")


def parse_query(query: bytes) -> tuple[bool, float]:
    """(fragment?, refresh seconds) from the query string, or BadRequest."""
    try:
        q = parse_qs(query.decode("ascii"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("the query string must be ASCII") from None
    refresh = REFRESH_DEFAULT_S
    if "refresh" in q:
        raw = q["refresh"][-1]
        try:
            refresh = float(raw)
        except ValueError:
            refresh = float("nan")
        if not REFRESH_MIN_S <= refresh <= REFRESH_MAX_S:  # NaN fails too
            raise BadRequest(f"refresh={raw[:40]!r}: a number of seconds from "
                             f"{REFRESH_MIN_S:g} to {REFRESH_MAX_S:g}")
    return "fragment" in q, refresh


# ------------------------------------------------------------ the server side
@dataclass
class Response:
    status: str
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


HTML = "text/html; charset=utf-8"
NO_STORE = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))


class StatusPage:
    """One per metrics listener: the snapshot cache, the rate meter, ring shares."""

    def __init__(self, daemon, max_age_s: float = SNAPSHOT_MAX_AGE_S):
        self.d = daemon
        self.max_age_s = max_age_s
        self.rates = RateMeter()
        self.ring_shares = ShareCache()
        self.snapshots = 0  # how many were taken (the cost is per snapshot)
        self._snap: tuple[float, dict] | None = None
        self._taking: asyncio.Future | None = None
        self._rendered: dict[tuple, bytes] = {}

    async def snapshot(self) -> dict:
        now = time.monotonic()
        if self._snap is not None and now - self._snap[0] < self.max_age_s:
            return self._snap[1]
        task = self._taking
        if task is None:  # requests meanwhile wait for this one (the first census walk)
            task = self._taking = asyncio.ensure_future(self._take())
            task.add_done_callback(lambda _t: setattr(self, "_taking", None))
        snap = await asyncio.shield(task)
        if self._snap is None or self._snap[1] is not snap:
            self._snap, self._rendered = (time.monotonic(), snap), {}
            self.snapshots += 1
        return snap

    async def _take(self) -> dict:
        from l4lb.metrics import census_cache  # noqa: PLC0415 - metrics imports this module

        d = self.d
        if d.tables is None or not d.ready:
            return not_ready(d.cfg.node.name)
        t = d.tables
        census = await census_cache(t).get(t)  # a walk in a thread, reused for 5 s
        status, stats = d.status(), d.stats()  # both on the loop, back to back: consistent
        ids = {vs.key: vs.vip_id for vs in t.vips.values()}
        for v in status["vips"]:
            if v["vip"] in ids:
                v["id"] = ids[v["vip"]]
        counters = {}
        for v in stats["vips"]:
            counters[(v["vip"],)] = (v["packets"], v["new_flows"])
            for r in v["reals"]:
                counters[(v["vip"], r["address"])] = (r["packets"], r["new_flows"])
        rates = self.rates.update(time.monotonic(), counters)
        # The ring this process last published for each VIP (it is the live one).
        last = getattr(t, "_last_ring", {})
        rings = {k: last.get(k) for k in ids}
        window, capacity = self.rates.window, d.cfg.node.conn_table_size

        def join() -> dict:  # in a thread: ~30-50 ms at 4,000 reals, rings counted anew
            # status/stats are fresh dicts, rings are replaced and never changed in
            # place, and one snapshot is taken at a time (the share cache's only user)
            shares = {k: self.ring_shares.shares(k, ring) for k, ring in rings.items()}
            return compose(status, stats, census=census, shares=shares, rates=rates,
                           rate_window_s=window, capacity=capacity)

        return await asyncio.to_thread(join)

    async def handle(self, path: bytes, query: bytes) -> Response:
        try:
            fragment, refresh = parse_query(query)
        except BadRequest as e:
            return Response("400 Bad Request", "text/plain; charset=utf-8",
                            f"l4lb: {e}\n".encode(), NO_STORE)
        snap = await self.snapshot()
        if path == b"/status.json":
            kind, ctype = ("json",), "application/json"
        elif fragment:
            kind, ctype = ("fragment",), HTML
        else:
            kind, ctype = ("page", refresh), HTML
        body = self._rendered.get(kind)
        if body is None:  # rendered off the loop: thousands of reals make a big page
            body = await asyncio.to_thread(_render, kind, snap)
            if self._snap is not None and self._snap[1] is snap:
                self._rendered[kind] = body
        headers = NO_STORE + ((("Content-Security-Policy", CSP),) if ctype == HTML else ())
        return Response("200 OK", ctype, body, headers)


def _render(kind: tuple, snap: dict) -> bytes:
    if kind[0] == "json":
        # compact: the C encoder (indent= falls back to the Python one, ~10x slower)
        return json.dumps(snap, separators=(",", ":")).encode() + b"\n"
    if kind[0] == "fragment":
        return render_main(snap).encode()
    return render_page(snap, kind[1]).encode()
