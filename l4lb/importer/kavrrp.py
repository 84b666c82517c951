"""vrrp_instance -> [[vrrp]]: priorities, tracks with keepalived's weight rule, auth, unicast, VIPs."""

from __future__ import annotations

from typing import Any

from l4lb.importer import common as c
from l4lb.importer.emit import Table
from l4lb.importer.kabase import NO_EQUIV, KaBase
from l4lb.importer.keepalived import Stmt


class VrrpPart(KaBase):
    """vrrp_instance and what it refers to (mixed into KaConverter)."""

    def vrrp_instance(self, st: Stmt) -> None:
        if not st.args:
            self.r.error(st.loc, "vrrp_instance needs a name")
            return
        raw = st.args[0]
        name = c.safe_name(raw, c.VRRP_NAME, 64)
        if name != raw:
            self.r.changed(st.loc, "vrrp_instance", f"name {raw!r} written as {name!r} (l4lb names use A-Z a-z 0-9 _ . -)")
        t = Table([f"vrrp_instance {raw} ({st.loc})"], st.loc)
        t.set("name", name)
        f: dict[str, Any] = {"version": None, "advert": 1.0, "vips": [], "peers": [], "src": None,
                             "auth": None, "priority": 100}
        tracks_s: list[dict] = []
        tracks_i: list[dict] = []
        weights: list[tuple[str, int]] = []
        for ch in st.children or []:
            k = ch.keyword
            if k == "interface" and ch.args:
                if c.valid_ifname(ch.args[0]):
                    f["interface"] = ch.args[0]
                else:
                    self.r.error(ch.loc, f"interface {ch.args[0]!r} is not a valid Linux interface name")
            elif k == "virtual_router_id":
                f["vrid"] = self.num(ch, int, 1, 255)
            elif k == "priority":
                v = self.num(ch, int, 1, 255)
                if v:
                    f["priority"] = v
            elif k == "advert_int":
                v = self.num(ch, float, 0.01, 255)
                if v:
                    f["advert"] = v
                    f["advert_loc"] = ch.loc
            elif k == "version":
                f["version"] = self.num(ch, int, 2, 3)
            elif k == "state":
                self.r.changed(ch.loc, k, f"{' '.join(ch.args)}: l4lb has no initial state; every instance "
                                          "starts as backup and the highest priority becomes master after "
                                          "Master_Down_Interval (about 3 adverts), as RFC 5798 says")
            elif k == "nopreempt":
                t.set("preempt", False)
            elif k == "preempt":
                pass  # keepalived's default, and l4lb's
            elif k == "preempt_delay":
                v = self.num(ch, float, 0, 3600)
                if v is not None:
                    f["preempt_delay"] = v
            elif k == "authentication":
                self.auth(ch, f)
            elif k == "unicast_src_ip":
                a = c.ip(ch.args[0]) if ch.args else None
                if a is None:
                    self.r.error(ch.loc, f"unicast_src_ip {' '.join(ch.args)}: not an IP address")
                else:
                    f["src"] = (a, ch.loc)
            elif k == "unicast_peer":
                for p in ch.children or []:
                    a = c.ip(p.keyword)
                    if a is None:
                        self.r.error(p.loc, f"unicast_peer {p.keyword}: not an IP address")
                        continue
                    if p.args:
                        self.r.unsupported(p.loc, "unicast_peer", f"options {' '.join(p.args)} dropped")
                    f["peers"].append((a, p.loc))
            elif k == "virtual_ipaddress":
                for v in ch.children or []:
                    self.vip_line(v, f)
            elif k in ("notify", "notify_master", "notify_backup", "notify_fault"):
                self.notify(ch, t)
            elif k == "track_script":
                for ts in ch.children or []:
                    got = self.track_script(ts)
                    if got:
                        tracks_s.append(got)
                        if got["weight"]:
                            weights.append((ts.keyword, got["weight"]))
            elif k == "track_interface":
                for ti in ch.children or []:
                    got = self.track_interface(ti)
                    if got:
                        tracks_i.append(got)
                        if got["weight"]:
                            weights.append((ti.keyword, got["weight"]))
            elif k == "garp_master_repeat":
                v = self.num(ch, int, 0, 100)
                if v is not None:
                    t.set("garp_count", v)
            elif k == "garp_master_refresh":
                v = self.num(ch, float, 0, 3600)
                if v is not None:
                    t.set("garp_refresh_s", v)
            elif k == "accept":
                t.set("accept_mode", True)
            elif k == "no_accept":
                t.set("accept_mode", False)
            elif k == "lvs_sync_daemon_interface" and ch.args:
                self.sync_req = (ch.args[0], raw, ch.loc)
            else:
                self.other(ch, f"vrrp_instance {raw}")
        self.finish_instance(st, t, f, tracks_s, tracks_i, weights, raw)

    def auth(self, st: Stmt, f: dict) -> None:
        kind, pw = None, None
        for ch in st.children or []:
            if ch.keyword == "auth_type" and ch.args:
                kind = (ch.args[0].upper(), ch.loc)
            elif ch.keyword == "auth_pass" and ch.args:
                pw = (ch.args[0], ch.loc)
            else:
                self.other(ch, "authentication")
        if kind and kind[0] == "AH":
            self.r.unsupported(kind[1], "auth_type", "AH (IPsec) authentication is not supported: l4lb's "
                                                     "adverts would carry none; drop it on the peer too")
            return
        if pw:
            f["auth"] = pw

    def vip_line(self, v: Stmt, f: dict) -> None:
        a = c.iface(v.keyword)
        if a is None or a.ip.is_multicast or a.ip.is_unspecified:
            self.r.error(v.loc, f"virtual_ipaddress {v.keyword}: not a unicast address[/prefix]")
            return
        words = v.args
        i = 0
        while i < len(words):
            w = words[i]
            val = words[i + 1] if i + 1 < len(words) else ""
            if w == "dev":
                f.setdefault("vip_devs", []).append((val, v.loc))
            elif w == "label":
                self.r.unsupported(v.loc, "label", f"{val}: l4lb adds VIPs without a label")
            elif w in ("brd", "broadcast", "scope", "preferred_lft"):
                self.r.unsupported(v.loc, w, f"{w} {val} dropped: l4lb adds VIPs with its own lifetimes")
            elif w == "no_track":
                self.r.unsupported(v.loc, w, "l4lb tracks the VRRP interface only")
                i += 1
                continue
            else:
                self.r.unsupported(v.loc, w, "option dropped")
                i += 1
                continue
            i += 2
        if any(x[0] == a for x in f["vips"]):
            self.r.note(v.loc, "virtual_ipaddress", f"{a} is listed twice; written once")
            return
        f["vips"].append((a, v.loc))

    def notify(self, st: Stmt, t: Table) -> None:
        if not st.args:
            self.r.error(st.loc, f"{st.keyword} needs a script")
            return
        argv, shell = c.command_argv(st.args[0])
        if argv is None:
            self.r.error(st.loc, f"{st.keyword}: empty script")
            return
        if len(st.args) > 1:
            self.r.unsupported(st.loc, "user", f"{' '.join(st.args[1:])}: {NO_EQUIV['user']}")
        if shell:
            self.r.changed(st.loc, st.keyword, "shell syntax: run through /bin/sh -c")
        if st.keyword == "notify":
            msg = "called with INSTANCE <name> <STATE> <priority> appended, as keepalived does"
            self.r.note(st.loc, st.keyword, msg)
        else:
            self.r.changed(st.loc, st.keyword, "l4lb appends INSTANCE <name> <STATE> to the command; "
                                               "keepalived appends nothing to notify_master/backup/fault")
        t.set(st.keyword, argv)

    def track_script(self, ts: Stmt) -> dict | None:
        name = ts.keyword
        s = self.scripts.get(name)
        if s is None:
            self.r.unsupported(ts.loc, "track_script", f"no vrrp_script {name!r} is defined (keepalived ignores "
                                                       "it too); dropped")
            return None
        if s.argv is None:
            return None
        weight, reverse = s.weight, s.reverse
        if ts.args[:1] == ["weight"] and len(ts.args) >= 2:
            w = c.to_int(ts.args[1])
            if w is None or not -254 <= w <= 254:
                self.r.error(ts.loc, f"track_script {name}: weight {ts.args[1]} is not in -254..254")
                return None
            weight, reverse = w, "reverse" in ts.args[2:]
        elif ts.args:
            self.r.unsupported(ts.loc, "track_script", f"{' '.join(ts.args)} dropped")
        if reverse:
            self.r.unsupported(ts.loc, "reverse", f"{name}: reversed tracking has no l4lb equivalent; "
                                                  "invert the script's exit code instead; track dropped")
            return None
        if weight > 0:
            self.r.note(ts.loc, "weight", f"{name} weight {weight}: keepalived adds {weight} to the priority "
                                          f"while the script succeeds and nothing while it fails "
                                          "(keepalived.conf(5), vrrp_script); l4lb does the same. A comment "
                                          "saying the weight is subtracted on failure describes a negative weight")
        return {"script": list(s.argv), "interval_s": float(s.interval), "weight": weight,
                "rise": s.rise, "fall": s.fall}

    def track_interface(self, ti: Stmt) -> dict | None:
        name = ti.keyword
        if not c.valid_ifname(name):
            self.r.error(ti.loc, f"track_interface {name!r} is not a valid interface name")
            return None
        weight = 0
        if ti.args[:1] == ["weight"] and len(ti.args) >= 2:
            w = c.to_int(ti.args[1])
            if w is None or not -254 <= w <= 254:
                self.r.error(ti.loc, f"track_interface {name}: weight {ti.args[1]} is not in -254..254")
                return None
            weight = w
            if "reverse" in ti.args[2:]:
                self.r.unsupported(ti.loc, "reverse", f"{name}: reversed tracking has no l4lb equivalent; dropped")
                return None
        elif ti.args:
            self.r.unsupported(ti.loc, "track_interface", f"{' '.join(ti.args)} dropped")
        return {"name": name, "weight": weight}

    def finish_instance(self, st: Stmt, t: Table, f: dict, tracks_s: list[dict], tracks_i: list[dict],
                        weights: list[tuple[str, int]], raw: str) -> None:
        missing = [k for k, kw in (("interface", "interface"), ("vrid", "virtual_router_id")) if f.get(k) is None]
        if missing or not f["vips"]:
            what = ", ".join([{"vrid": "virtual_router_id"}.get(m, m) for m in missing]
                             + ([] if f["vips"] else ["virtual_ipaddress"]))
            self.r.unsupported(st.loc, "vrrp_instance", f"{raw} has no {what}; l4lb needs it, instance dropped")
            return
        vips = f["vips"]
        fam = vips[0][0].version
        kept = []
        for a, loc in vips:
            if a.version != fam:
                self.r.unsupported(loc, "virtual_ipaddress", f"{a} is IPv{a.version} but {vips[0][0]} is "
                                                             f"IPv{fam}; one l4lb instance carries one family: "
                                                             "put it into a second vrrp_instance")
            else:
                kept.append(a)
        for dev, loc in f.get("vip_devs", []):
            if dev != f["interface"]:
                self.r.changed(loc, "dev", f"{dev}: l4lb adds every VIP of an instance to its interface "
                                           f"{f['interface']}")
        version = f["version"] or self.version
        if fam == 6 and version == 2:
            if f["version"] == 2:
                self.r.changed(st.loc, "version", "IPv6 needs VRRPv3; written as version 3 (keepalived does the same)")
            version = 3
        t.set("interface", f["interface"])
        t.set("vrid", f["vrid"])
        t.set("priority", f["priority"])
        t.set("version", version, None if f["version"] else "keepalived's default (vrrp_version)")
        adv = f["advert"]
        if version == 2 and not float(adv).is_integer():
            new = float(max(1, int(adv) + 1))
            self.r.changed(f.get("advert_loc"), "advert_int", f"{adv:g} s: VRRPv2 counts whole seconds; written as {new:g}")
            adv = new
        elif version == 3:
            new = min(40.95, max(0.01, round(adv * 100) / 100))
            if new != adv:
                self.r.changed(f.get("advert_loc"), "advert_int", f"{adv:g} s: VRRPv3 counts centiseconds "
                                                                  f"up to 40.95; written as {new:g}")
            adv = new
        t.set("advert_interval_s", float(adv))
        if "preempt_delay" in f:
            t.set("preempt_delay_s", float(f["preempt_delay"]))
        if f["auth"]:
            pw, loc = f["auth"]
            if version == 3:
                self.r.unsupported(loc, "authentication", "VRRPv3 has no authentication (RFC 5798); keepalived "
                                                          "ignores it too for version 3")
            else:
                if len(pw) > 8:
                    self.r.changed(loc, "auth_pass", f"longer than 8 characters; VRRPv2 carries 8, written as {pw[:8]!r}")
                    pw = pw[:8]
                t.set("auth_pass", pw)
        src = f["src"]
        peers = []
        for a, loc in f["peers"]:
            if a.version != fam:
                self.r.unsupported(loc, "unicast_peer", f"{a} is not IPv{fam} like the VIPs; dropped")
            elif src and a == src[0]:
                self.r.unsupported(loc, "unicast_peer", f"{a} is this node's unicast_src_ip; dropped")
            elif str(a) not in peers:
                peers.append(str(a))
        if src:
            if src[0].version != fam:
                self.r.unsupported(src[1], "unicast_src_ip", f"{src[0]} is not IPv{fam} like the VIPs; dropped")
            elif not peers:
                self.r.unsupported(src[1], "unicast_src_ip", "without unicast_peer adverts are multicast; dropped")
            else:
                t.set("unicast_src", str(src[0]))
        if peers:
            t.set("unicast_peers", peers)
        t.set("vips", [a.with_prefixlen if a.network.prefixlen != a.max_prefixlen else str(a.ip) for a in kept])
        if self.garp_count is not None and "garp_count" not in t:
            t.set("garp_count", self.garp_count, "vrrp_garp_master_repeat")
        if self.garp_refresh is not None and "garp_refresh_s" not in t:
            t.set("garp_refresh_s", self.garp_refresh, "vrrp_garp_master_refresh")
        if tracks_i:
            seen: set[str] = set()
            uniq = [x for x in tracks_i if not (x["name"] in seen or seen.add(x["name"]))]
            t.set("track_interfaces", uniq)
        if tracks_s:
            t.set("track_scripts", tracks_s)
        # Keys in the order of configs/ha-lb1.toml, whatever the order in the file.
        order = ("name", "interface", "vrid", "priority", "version", "advert_interval_s", "preempt",
                 "preempt_delay_s", "accept_mode", "auth_pass", "unicast_src", "unicast_peers", "vips",
                 "garp_count", "garp_refresh_s", "track_interfaces", "track_scripts", "notify",
                 "notify_master", "notify_backup", "notify_fault")
        items, notes = t.items, t.notes
        t.items = {k: items[k] for k in sorted(items, key=order.index)}
        t.notes = notes
        base = f["priority"]
        up = sum(w for _, w in weights if w > 0)
        down = sum(w for _, w in weights if w < 0)
        if weights:
            desc = ", ".join(f"{n} {w:+d} while {'up' if w > 0 else 'down'}" for n, w in weights)
            line = (f"{t.get('name')}: priority {base}; with tracks {max(1, min(254, base + down))}.."
                    f"{max(1, min(254, base + up))} ({desc})")
            self.out.summary.append(line)
            t.comments.append(f"effective priority {max(1, min(254, base + down))}..{max(1, min(254, base + up))}: {desc}")
        self.out.vrrp.append(t)
        self.out.vrrp_vips.extend(kept)
        if f["interface"] not in self.out.interfaces:
            self.out.interfaces.append(f["interface"])
        self.out.instances[raw] = {"name": t.get("name"), "src": t.get("unicast_src"), "peers": peers,
                                   "interface": f["interface"]}

