"""What a SyncAgent reports: its status() dict (API, `l4lb status`) and its
prometheus_client metric families. Read-only views of the agent's counters."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from l4lb.sync.machine import REJECT_REASONS


def peer_states(agent) -> list[dict]:
    rst = agent.receiver.status()["peers"]
    now = agent._clock()
    out = []
    matched = set()
    for host, port in agent.peers:
        name, info = None, None
        for n, p in rst.items():
            addr = p.get("addr")
            if isinstance(addr, tuple) and addr[0] == host and addr[1] == port:
                name, info = n, p
                break
        if name is not None:
            matched.add(name)
        out.append(_peer_row(_fmt_addr((host, port)), name, info, now))
    for n, p in rst.items():  # authenticated senders from elsewhere (NAT, other port)
        if n not in matched:
            out.append(_peer_row(_fmt_addr(p.get("addr")), n, p, now))
    return out

def status(agent) -> dict:
    s, r = agent.sender, agent.receiver
    ss, rs = s.stats, r.stats
    peers = peer_states(agent)
    lag = rs.get("lag_s")
    if s.full_in_progress:
        state = "full walk"
    elif any(p["state"] == "up" for p in peers):
        state = "connected"
    elif any(p["state"] == "down" for p in peers):
        state = "peer down"
    else:
        state = "waiting for peer"
    return {
        "role": s.role,
        "state": state,
        "node_id": agent.node_name,
        "listen": str(agent.cfg.listen),
        "peers": ", ".join(
            f"{p['address']} ({p['name'] or '?'}: {p['state']}"
            f"{', ' + p['role'] if p['role'] else ''})" for p in peers),
        "peer_detail": peers,
        "entries_sent": ss["entries"] + ss["full_entries"],
        "entries_received": rs["entries"],
        "entries_installed": agent.counters["installed"],
        "entries_skipped": dict(agent.skipped),
        "lag_ms": None if lag is None else round(lag * 1000, 3),
        "max_lag_ms": round(rs["max_lag_s"] * 1000, 3),
        "messages_sent": ss["messages"],
        "messages_received": rs["messages"],
        "rejected": {k: v for k, v in r.counters.items() if v},
        "full_walks": {"sent_started": ss["full_started"],
                       "sent_completed": ss["full_completed"],
                       "sent_aborted": ss["full_aborted"],
                       "sent_failed": ss["full_failed"],
                       "in_progress": s.full_in_progress,
                       "entries_sent": ss["full_entries"],
                       "entries_skipped": dict(agent.walk_skipped),
                       "received_complete": sum(p["full_complete"] or 0 for p in peers),
                       "received_entries": rs["full_entries"]},
        "new_flows": {"events": agent.counters["events"],
                      "pending": s.pending_entries,
                      "dropped_not_master": ss["dropped_not_master"],
                      "unknown_real": agent.counters["events_unknown_real"],
                      "bad": agent.counters["events_bad"]},
        "full_backlog": len(agent._deferred),  # full-walk datagrams set aside
        "full_backlog_dropped": r.counters["backlog_full"],
        "session": s.session,
        "bound": _fmt_addr(agent.bound) if agent.bound else None,
        "send_errors": agent.counters["send_errors"] + agent.counters["send_dropped"],
        "install_errors": agent.counters["install_errors"],
        "ring_mode": agent.ring_mode,
        # UDP segmentation offload in use (udp.py: UDP_SEGMENT / UDP_GRO)
        "offload": {"gso": agent.gso, "gro": agent.gro,
                    "gso_sends": agent.counters["gso_sends"],
                    "gso_fallbacks": agent.counters["gso_fallbacks"]},
        # CPU seconds of the walk and install threads (agent.CPU_PARTS, user/sys)
        "cpu_s": {k: round(v, 6) for k, v in agent.cpu_s.items()},
    }

def metrics(agent):
    """prometheus_client metric families (l4lb/metrics.py yields them)."""
    s, r = agent.sender, agent.receiver
    ss, rs = s.stats, r.stats
    role = GaugeMetricFamily("l4lb_sync_role", "Sync role: 1 on the current one.",
                             labels=["role"])
    for name in ("master", "backup"):
        role.add_metric([name], 1 if s.role == name else 0)
    yield role
    up = GaugeMetricFamily("l4lb_sync_peer_up",
                           "1 while the peer's messages arrive (authenticated).",
                           labels=["peer"])
    for p in peer_states(agent):
        up.add_metric([p["name"] or p["address"]], 1 if p["state"] == "up" else 0)
    yield up
    yield CounterMetricFamily("l4lb_sync_messages_sent", "Sync datagrams built and sent.",
                              value=ss["messages"])
    yield CounterMetricFamily("l4lb_sync_messages_received",
                              "Sync datagrams accepted (authenticated, in sequence window).",
                              value=rs["messages"])
    sent = CounterMetricFamily("l4lb_sync_entries_sent",
                               "Conn entries sent: new flows, and full-walk entries.",
                               labels=["kind"])
    sent.add_metric(["new"], ss["entries"])
    sent.add_metric(["full"], ss["full_entries"])
    yield sent
    recv = CounterMetricFamily("l4lb_sync_entries_received",
                               "Conn entries received from the peer.", labels=["kind"])
    recv.add_metric(["new"], rs["entries"] - rs["full_entries"])
    recv.add_metric(["full"], rs["full_entries"])
    yield recv
    yield CounterMetricFamily("l4lb_sync_entries_installed",
                              "Conn entries written to this node's conn table.",
                              value=agent.counters["installed"])
    skipped = CounterMetricFamily("l4lb_sync_entries_skipped",
                                  "Received entries not installed, by reason.",
                                  labels=["reason"])
    for reason, n in sorted(agent.skipped.items()):
        skipped.add_metric([reason], n)
    yield skipped
    rej = CounterMetricFamily("l4lb_sync_rejected", "Sync datagrams rejected, by reason.",
                              labels=["reason"])
    for reason in REJECT_REASONS:
        rej.add_metric([reason], r.counters.get(reason, 0))
    yield rej
    yield CounterMetricFamily("l4lb_sync_full_walks",
                              "Full conn-table walks sent to the peer to the end.",
                              value=ss["full_completed"])
    yield CounterMetricFamily("l4lb_sync_send_errors",
                              "Sync datagrams that could not be sent.",
                              value=agent.counters["send_errors"]
                              + agent.counters["send_dropped"])
    yield CounterMetricFamily("l4lb_sync_lost_messages",
                              "Sequence gaps in the peer's messages (lost datagrams).",
                              value=sum((p.get("lost") or 0)
                                        for p in r.status()["peers"].values()))
    lag = rs.get("lag_s")
    yield GaugeMetricFamily("l4lb_sync_lag_seconds",
                            "Age of the last batch of new flows when it arrived.",
                            value=0.0 if lag is None else max(0.0, lag))


def _fmt_addr(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr)


def _peer_row(address: str, name: str | None, p: dict | None, now: float) -> dict:
    if p is None:
        return {"address": address, "name": None, "state": "unknown", "role": None,
                "last_seen_s": None, "messages": 0, "entries": 0, "lost": 0, "lag_ms": None,
                "full_complete": 0}
    lag = p.get("lag_s")
    seen = p.get("last_seen")
    return {"address": address, "name": name, "state": "up" if p.get("alive") else "down",
            "role": p.get("role"),
            "last_seen_s": None if seen is None else round(now - seen, 3),
            "messages": p.get("messages", 0), "entries": p.get("entries", 0),
            "lost": p.get("lost", 0), "lag_ms": None if lag is None else round(lag * 1000, 3),
            "full_complete": p.get("full_complete", 0)}
