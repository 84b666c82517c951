"""Prometheus endpoint: a custom collector reads the BPF maps at scrape time.

Names follow Prometheus conventions (DESIGN.md §6): prefix l4lb_, base units,
_total on counters, labels vip="addr:port/proto" and real="address".
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from l4lb import __version__

log = logging.getLogger("l4lb.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class L4lbCollector:
    def __init__(self, daemon):
        self.d = daemon

    def collect(self):
        d = self.d
        yield InfoMetricFamily("l4lb_build", "Version of l4lb.",
                               value={"version": __version__, "node": d.cfg.node.name})
        stats = d.stats()
        names = {"packets": ("packets", "Packets forwarded"), "bytes": ("bytes", "Bytes forwarded"),
                 "new_flows": ("new_flows", "New flows (conn-table inserts)")}
        for field, (suffix, what) in names.items():
            vm = CounterMetricFamily(f"l4lb_vip_{suffix}", f"{what} for the VIP.",
                                     labels=["vip"])
            rm = CounterMetricFamily(f"l4lb_real_{suffix}", f"{what} to the real.",
                                     labels=["vip", "real"])
            for v in stats["vips"]:
                vm.add_metric([v["vip"]], v[field])
                for r in v["reals"]:
                    rm.add_metric([v["vip"], r["address"]], r[field])
            yield vm
            yield rm
        up = GaugeMetricFamily("l4lb_real_up", "1 when the real passes its health check.",
                               labels=["vip", "real"])
        weight = GaugeMetricFamily("l4lb_real_weight", "Configured weight (0 = drain).",
                                   labels=["vip", "real"])
        in_ring = GaugeMetricFamily("l4lb_real_in_ring", "1 when the real takes new flows.",
                                    labels=["vip", "real"])
        hc_checks = CounterMetricFamily("l4lb_healthcheck_checks", "Health checks run.",
                                        labels=["vip", "real"])
        hc_fail = CounterMetricFamily("l4lb_healthcheck_failures", "Health checks failed.",
                                      labels=["vip", "real"])
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
                        hc_lat.add_metric(lab, chk.last.latency_s)
        yield from (up, weight, in_ring, hc_checks, hc_fail, hc_lat)

        g = stats["global"]
        verdicts = CounterMetricFamily("l4lb_packets_by_verdict",
                                       "Packets seen by the XDP program, by verdict and reason.",
                                       labels=["verdict", "reason"])
        for name, value in g.items():
            verdict, _, reason = name.partition("_")
            if verdict in ("pass", "drop", "tx"):
                verdicts.add_metric([verdict, reason], value)
        yield verdicts
        yield CounterMetricFamily("l4lb_conn_table_hits", "Packets of known flows.",
                                  value=g["conn_hit"])
        yield CounterMetricFamily("l4lb_conn_table_misses",
                                  "Packets that started a new flow.", value=g["conn_miss"])
        yield CounterMetricFamily("l4lb_conn_table_rescheduled",
                                  "Known flows moved because their real went down or idled out.",
                                  value=g["conn_rescheduled"])
        yield CounterMetricFamily("l4lb_icmp_forwarded",
                                  "ICMP errors forwarded to the real of their flow.",
                                  value=g["icmp_forwarded"])
        yield CounterMetricFamily("l4lb_flow_events_lost",
                                  "New-flow events lost because the ring buffer was full.",
                                  value=g["flow_event_lost"])
        yield GaugeMetricFamily("l4lb_conn_table_entries", "Entries in the connection table.",
                                value=d.tables.conn_count())
        yield from self._vrrp()
        if d.sync is not None:
            yield from d.sync.metrics()

    def _vrrp(self):
        state = GaugeMetricFamily("l4lb_vrrp_state",
                                  "VRRP state per instance: 1 on the current state.",
                                  labels=["instance", "state"])
        prio = GaugeMetricFamily("l4lb_vrrp_priority", "Effective VRRP priority.",
                                 labels=["instance"])
        trans = CounterMetricFamily("l4lb_vrrp_transitions", "VRRP state transitions.",
                                    labels=["instance"])
        sent = CounterMetricFamily("l4lb_vrrp_adverts_sent", "VRRP adverts sent.",
                                   labels=["instance"])
        recv = CounterMetricFamily("l4lb_vrrp_adverts_received", "VRRP adverts received.",
                                   labels=["instance"])
        rej = CounterMetricFamily("l4lb_vrrp_adverts_rejected",
                                  "VRRP adverts dropped, by reason.", labels=["instance", "reason"])
        for a in self.d.vrrp:
            s = a.status()
            name = s.get("name", "?")
            for st in ("initialize", "backup", "master"):
                state.add_metric([name, st], 1 if s.get("state") == st else 0)
            prio.add_metric([name], s.get("priority", 0))
            c = s.get("counters", {})
            trans.add_metric([name], sum(c.get("transitions", {}).values())
                             if isinstance(c.get("transitions"), dict) else 0)
            sent.add_metric([name], c.get("adverts_sent", 0))
            recv.add_metric([name], c.get("adverts_received", 0))
            for reason, n in (c.get("rejected") or {}).items():
                rej.add_metric([name, reason], n)
        yield from (state, prio, trans, sent, recv, rej)


def render(daemon) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(L4lbCollector(daemon))
    return generate_latest(reg)


async def serve(daemon):
    """A minimal HTTP/1.0 server on the asyncio loop: GET /metrics."""
    ep = daemon.cfg.metrics.listen

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            req = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = req.split(b" ", 2)[1] if req.count(b" ") >= 2 else b"/"
            if path.split(b"?")[0] == b"/metrics":
                body, status, ctype = render(daemon), "200 OK", CONTENT_TYPE
            else:
                body = b"l4lb: metrics are at /metrics\n"
                status, ctype = "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - a broken scrape must not hurt the daemon
            log.exception("metrics scrape failed")
        finally:
            writer.close()

    try:
        return await asyncio.start_server(handle, str(ep.host), ep.port)
    except OSError as e:
        raise RuntimeError(f"metrics.listen {ep}: cannot listen ({e.strerror}); pick a free "
                           "port or set metrics.enabled = false") from None
