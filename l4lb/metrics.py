"""Prometheus endpoint: a custom collector reads the BPF maps at scrape time.

Names follow Prometheus conventions (README: Metrics): prefix l4lb_, base units,
_total on counters, labels vip="addr:port/proto" and real="address".

prometheus_client adds the _total suffix of a counter itself (the family is
named without it; the exposition says ``# TYPE l4lb_vip_packets_total counter``
and the samples are ``l4lb_vip_packets_total``), so the names below carry none.

Served by `l4lb start` on ``metrics.listen`` (a tiny asyncio HTTP/1.0 server on
the daemon's event loop: GET /metrics; / and /status.json are the live status page
of l4lb.statuspage). The conn-table census (entries in all, by
VIP, by real), the one part of a scrape that grows with traffic, is a walk of up
to millions of entries: it runs in a thread with BPF_MAP_LOOKUP_BATCH, at most
once every CENSUS_MAX_AGE_S, and scrapes in between reuse its counts (their age
is l4lb_conn_table_census_age_seconds). The rest reads the small per-VIP and
per-real counter maps on the event loop at scrape time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from l4lb import __version__

log = logging.getLogger("l4lb.metrics")
# Our names are all legacy-valid, so the classic text format describes the output
# exactly, and every Prometheus version parses it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
VRRP_STATES = ("initialize", "backup", "master", "fault")
VERDICTS = ("pass", "drop", "tx")
CONN_BATCH = 8192
CENSUS_MAX_AGE_S = 5.0  # scrapes reuse conn-table counts younger than this


@dataclass
class ConnCensus:
    """Conn-table entries: all of them, and by the VIP / real id they name."""

    total: int = 0
    by_vip: Counter = field(default_factory=Counter)
    by_real: Counter = field(default_factory=Counter)
    per_id: bool = True  # False: only `total` is known (no batch lookups here)
    taken_at: float = field(default_factory=time.monotonic)  # when the walk ended
    duration_s: float = 0.0  # how long the walk took


def conn_census(tables) -> ConnCensus:
    """Count the conn table by VIP id and real id; thread-safe (only the map fd)."""
    import numpy as np  # noqa: PLC0415 - a dependency of the tables already

    from l4lb.dataplane.tables import CONN_VAL_DTYPE as dtype  # noqa: PLC0415 - struct conn_val

    t0 = time.monotonic()
    c = ConnCensus()
    try:
        for _keys, vals, n in tables.conn_batches(CONN_BATCH):
            arr = np.frombuffer(vals, dtype=dtype, count=n)
            c.total += n
            for col, counter in (("vip_id", c.by_vip), ("real_id", c.by_real)):
                ids, counts = np.unique(arr[col], return_counts=True)
                counter.update(dict(zip(ids.tolist(), counts.tolist(), strict=True)))
    except (OSError, AttributeError) as e:  # kernel without batch ops: one syscall per key
        log.debug("conn-table batch walk failed (%s); counting entry by entry", e)
        return ConnCensus(total=tables.conn_count(), per_id=False,
                          duration_s=time.monotonic() - t0)
    c.taken_at = time.monotonic()
    c.duration_s = c.taken_at - t0
    return c


class CensusCache:
    """The conn-table census, walked in a thread at most once every ``max_age_s``.

    A scrape gets the cached counts while they are fresh; a scrape that finds them
    older starts one walk in a thread and answers with the old counts meanwhile
    (only the very first scrape waits for a walk). However many scrapes come, one
    walk at a time.
    """

    def __init__(self, max_age_s: float = CENSUS_MAX_AGE_S):
        self.max_age_s = max_age_s
        self.census: ConnCensus | None = None
        self.walks = 0
        self._task: asyncio.Future | None = None

    async def get(self, tables) -> ConnCensus:
        c = self.census
        if c is not None and time.monotonic() - c.taken_at < self.max_age_s:
            return c
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(asyncio.to_thread(conn_census, tables))
            self._task.add_done_callback(self._walked)
        if c is None:
            await asyncio.shield(self._task)  # raises if the first walk failed
        return self.census if self.census is not None else c

    def _walked(self, task: asyncio.Future) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("conn-table census failed: %r", task.exception())
            return
        self.census = task.result()
        self.walks += 1


# One cache per ServiceTables (a new data plane starts a new cache).
_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def census_cache(tables) -> CensusCache:
    cache = _caches.get(tables)
    if cache is None:
        cache = _caches[tables] = CensusCache()
    return cache


class L4lbCollector:
    """Everything `l4lb start` exports. ``census`` is a ConnCensus taken off the
    event loop by the server; without one the collector walks the table itself."""

    def __init__(self, daemon, census: ConnCensus | None = None):
        self.d = daemon
        self.census = census

    def collect(self):
        d = self.d
        yield InfoMetricFamily("l4lb_build", "Version of l4lb and the node name.",
                               value={"version": __version__, "node": d.cfg.node.name})
        yield GaugeMetricFamily("l4lb_start_time_seconds",
                                "Unix time the daemon started.", value=d.started)
        yield CounterMetricFamily("l4lb_config_reloads", "Config reloads applied.",
                                  value=d.reloads)
        if d.tables is None:
            return  # the data plane is still loading: only the lines above yet
        census = self.census if self.census is not None else conn_census(d.tables)
        yield from self._traffic(census)
        yield from self._reals()
        yield from self._global(census)
        yield from self._vrrp()
        if hasattr(d.vrrp, "metrics"):  # the VRRP runner: loop lags, real-time flag
            yield from d.vrrp.metrics()
        if d.sync is not None:
            yield from d.sync.metrics()
        if getattr(d, "routing", None) is not None:  # ECMP: sessions, announcements
            yield from d.routing.metrics()

    # -------------------------------------------------------- per VIP, per real
    def _traffic(self, census: ConnCensus):
        d = self.d
        stats = d.stats()
        what = {"packets": "Packets forwarded (whole frames, as XDP saw them)",
                "bytes": "Bytes forwarded: whole frames, Ethernet header included",
                "new_flows": "New flows (conn-table inserts)"}
        for fld, text in what.items():
            vm = CounterMetricFamily(f"l4lb_vip_{fld}", f"{text}, for the VIP.", labels=["vip"])
            rm = CounterMetricFamily(f"l4lb_real_{fld}", f"{text}, to the real.",
                                     labels=["vip", "real"])
            for v in stats["vips"]:
                vm.add_metric([v["vip"]], v[fld])
                for r in v["reals"]:
                    rm.add_metric([v["vip"], r["address"]], r[fld])
            yield vm
            yield rm
        if not census.per_id:
            return
        t = d.tables
        ve = GaugeMetricFamily("l4lb_vip_conn_table_entries",
                               "Conn-table entries of the VIP (idle ones too, until they expire "
                               "or are evicted).", labels=["vip"])
        re_ = GaugeMetricFamily("l4lb_real_conn_table_entries",
                                "Conn-table entries pinned to the real.", labels=["vip", "real"])
        for v in stats["vips"]:
            vs = t.vips.get(v["vip"])
            if vs is None:
                continue
            ve.add_metric([v["vip"]], census.by_vip.get(vs.vip_id, 0))
            for r in v["reals"]:
                rs = vs.reals.get(r["address"])
                re_.add_metric([v["vip"], r["address"]],
                               census.by_real.get(rs.real_id, 0) if rs else 0)
        yield ve
        yield re_

    def _reals(self):
        d = self.d
        up = GaugeMetricFamily("l4lb_real_up", "1 when the real passes its health check.",
                               labels=["vip", "real"])
        weight = GaugeMetricFamily("l4lb_real_weight", "Configured weight (0 = drain).",
                                   labels=["vip", "real"])
        in_ring = GaugeMetricFamily("l4lb_real_in_ring",
                                    "1 when the real takes new flows (up, weight > 0, MAC known).",
                                    labels=["vip", "real"])
        hc_checks = CounterMetricFamily("l4lb_healthcheck_checks", "Health checks run.",
                                        labels=["vip", "real"])
        hc_fail = CounterMetricFamily("l4lb_healthcheck_failures", "Health checks failed.",
                                      labels=["vip", "real"])
        hc_ok = GaugeMetricFamily("l4lb_healthcheck_last_success",
                                  "1 when the last health check passed.", labels=["vip", "real"])
        hc_lat = GaugeMetricFamily("l4lb_healthcheck_latency_seconds",
                                   "Duration of the last health check.", labels=["vip", "real"])
        for v in d.status()["vips"]:
            for r in v["reals"]:
                lab = [v["vip"], r["address"]]
                up.add_metric(lab, 1 if r["up"] else 0)
                weight.add_metric(lab, r["weight"])
                in_ring.add_metric(lab, 1 if r["in_ring"] else 0)
                chk = d.health.checks.get((v["vip"], r["address"]))
                if chk:
                    hc_checks.add_metric(lab, chk.checks)
                    hc_fail.add_metric(lab, chk.failures)
                    if chk.last:
                        hc_ok.add_metric(lab, 1 if chk.last.ok else 0)
                        hc_lat.add_metric(lab, chk.last.latency_s)
        yield from (up, weight, in_ring, hc_checks, hc_fail, hc_ok, hc_lat)

    # ------------------------------------------------------ the whole program
    def _global(self, census: ConnCensus):
        d = self.d
        g = d.tables.global_counters()
        verdicts = CounterMetricFamily(
            "l4lb_xdp_packets",
            "Packets seen by the XDP program for a VIP or passed to the kernel, by verdict "
            "(tx = forwarded, pass = to the kernel, drop) and reason.",
            labels=["verdict", "reason"])
        for name, value in g.items():
            verdict, _, reason = name.partition("_")
            if verdict in VERDICTS:
                verdicts.add_metric([verdict, reason], value)
        yield verdicts
        yield CounterMetricFamily("l4lb_conn_table_hits", "Packets of known flows.",
                                  value=g["conn_hit"])
        yield CounterMetricFamily("l4lb_conn_table_misses",
                                  "Packets that started a new flow (conn-table inserts).",
                                  value=g["conn_miss"])
        yield CounterMetricFamily("l4lb_conn_table_rescheduled",
                                  "Known flows moved because their real went down or idled out.",
                                  value=g["conn_rescheduled"])
        yield CounterMetricFamily("l4lb_conn_table_promoted",
                                  "TCP flows established (their packet after the SYN): moved from "
                                  "the SYN table into the conn table, and synced.",
                                  value=g["conn_promoted"])
        yield CounterMetricFamily("l4lb_conn_table_misses_non_syn",
                                  "TCP non-SYN packets of no known flow, forwarded by the ring "
                                  "without an entry.", value=g["conn_miss_non_syn"])
        yield CounterMetricFamily("l4lb_conn_table_admissions_refused",
                                  "New conn-table entries refused by the per-CPU admission guard "
                                  "(the flow is forwarded by the ring).",
                                  value=g["conn_guard_limited"])
        yield CounterMetricFamily("l4lb_icmp_forwarded",
                                  "ICMP errors forwarded to the real of their flow.",
                                  value=g["icmp_forwarded"])
        yield CounterMetricFamily("l4lb_flow_events_lost",
                                  "New-flow events lost because the ring buffer was full.",
                                  value=g["flow_event_lost"])
        yield GaugeMetricFamily("l4lb_conn_table_entries", "Entries in the connection table.",
                                value=census.total)
        yield GaugeMetricFamily(
            "l4lb_conn_table_census_age_seconds",
            "Age of the conn-table counts (l4lb_conn_table_entries, l4lb_vip_conn_table_entries, "
            f"l4lb_real_conn_table_entries): a walk in a thread, at most every "
            f"{CENSUS_MAX_AGE_S:g} s.", value=max(0.0, time.monotonic() - census.taken_at))
        yield GaugeMetricFamily("l4lb_conn_table_census_duration_seconds",
                                "How long the last walk of the conn table for those counts took.",
                                value=census.duration_s)
        yield GaugeMetricFamily("l4lb_conn_table_capacity",
                                "Size of the connection table (an LRU: full means evictions).",
                                value=d.cfg.node.conn_table_size)

    def _vrrp(self):
        # "vrrp_instance", not "instance": Prometheus gives every target an `instance`
        # label and would rename ours to exported_instance.
        if not self.d.vrrp:
            return
        state = GaugeMetricFamily("l4lb_vrrp_state",
                                  "VRRP state per instance: 1 on the current state.",
                                  labels=["vrrp_instance", "state"])
        prio = GaugeMetricFamily("l4lb_vrrp_priority", "Effective VRRP priority.",
                                 labels=["vrrp_instance"])
        trans = CounterMetricFamily("l4lb_vrrp_transitions", "VRRP state transitions.",
                                    labels=["vrrp_instance"])
        sent = CounterMetricFamily("l4lb_vrrp_adverts_sent", "VRRP adverts sent.",
                                   labels=["vrrp_instance"])
        recv = CounterMetricFamily("l4lb_vrrp_adverts_received", "VRRP adverts received.",
                                   labels=["vrrp_instance"])
        rej = CounterMetricFamily("l4lb_vrrp_adverts_rejected",
                                  "VRRP adverts dropped, by reason.",
                                  labels=["vrrp_instance", "reason"])
        for a in self.d.vrrp:
            s = a.status()
            name = s.get("name", "?")
            cur = s.get("state")
            for st in VRRP_STATES + ((cur,) if cur and cur not in VRRP_STATES else ()):
                state.add_metric([name, st], 1 if cur == st else 0)
            prio.add_metric([name], s.get("priority", 0))
            c = s.get("counters", {})
            tr = c.get("transitions")
            trans.add_metric([name], sum(tr.values()) if isinstance(tr, dict) else (tr or 0))
            sent.add_metric([name], c.get("adverts_sent", 0))
            recv.add_metric([name], c.get("adverts_received", 0))
            for reason, n in sorted((c.get("rejected") or {}).items()):
                rej.add_metric([name, reason], n)
        yield from (state, prio, trans, sent, recv, rej)


def render(daemon, census: ConnCensus | None = None) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(L4lbCollector(daemon, census))
    return generate_latest(reg)


async def scrape(daemon) -> bytes:
    """One scrape: the conn-table census from its cache (walked in a thread), the
    counter maps read now, on the loop."""
    census = None
    if daemon.tables is not None:
        census = await census_cache(daemon.tables).get(daemon.tables)
    return render(daemon, census)


_HINTS = {
    errno.EADDRINUSE: "another process listens there: pick a free port",
    errno.EADDRNOTAVAIL: "no interface of this node has that address: use one of its "
                         "addresses, or 0.0.0.0 / :: for all of them",
    errno.EACCES: "permission denied",
}


async def serve(daemon):
    """A minimal HTTP/1.0 server on the asyncio loop: GET /metrics, and the status
    page (l4lb.statuspage): / and /status.json."""
    from l4lb import statuspage  # noqa: PLC0415

    ep = daemon.cfg.metrics.listen
    page = statuspage.StatusPage(daemon)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            req = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = req.split(b"\r\n", 1)[0].split(b" ")
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"/")
            path, _, query = path.partition(b"?")
            extra = ()
            if method not in (b"GET", b"HEAD"):
                body, status, ctype = b"l4lb: only GET\n", "405 Method Not Allowed", "text/plain"
            elif path in statuspage.PATHS:
                try:
                    r = await page.handle(path, query)
                    body, status, ctype, extra = r.body, r.status, r.content_type, r.headers
                except Exception as e:  # noqa: BLE001 - a broken page must not hurt the daemon
                    log.exception("status page failed")
                    body = f"l4lb: status page failed: {e!r}\n".encode()
                    status, ctype = "500 Internal Server Error", "text/plain"
            elif path == b"/metrics":
                try:
                    body, status, ctype = await scrape(daemon), "200 OK", CONTENT_TYPE
                except Exception as e:  # noqa: BLE001 - a broken scrape must not hurt the daemon
                    log.exception("metrics scrape failed")
                    body = f"l4lb: scrape failed: {e!r}\n".encode()
                    status, ctype = "500 Internal Server Error", "text/plain"
            else:
                body = b"l4lb: metrics are at /metrics, the status page at / and /status.json\n"
                status, ctype = "404 Not Found", "text/plain"
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                    f"{len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in extra) +
                    "Connection: close\r\n\r\n").encode()
            writer.write(head if method == b"HEAD" else head + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - a broken client must not hurt the daemon
            log.exception("metrics request failed")
        finally:
            writer.close()

    try:
        return await asyncio.start_server(handle, str(ep.host), ep.port)
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        hint = _HINTS.get(e.errno, "check the address")
        raise RuntimeError(f"metrics.listen {ep}: cannot listen ({why}); {hint}, or set "
                           "metrics.enabled = false") from None
