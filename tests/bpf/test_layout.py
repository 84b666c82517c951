"""Every ctypes mirror (maps.py) against what bcc compiled, field by field, read back
from the kernel's BTF (as Cilium's alignchecker checks its Go mirrors); every other
encoder (numpy dtypes, struct formats) against the mirrors."""

import ctypes as ct
import shutil

import numpy as np
import pytest

from l4lb.dataplane import btf, loader, tables
from l4lb.dataplane import maps as M
from l4lb.sync import translate

OPTS = loader.BuildOptions(max_vips=16, max_reals=256, conn_table_size=65536)

# A program that only instantiates maps.h, plus the records no map names.
PROBE_C = '#include <uapi/linux/bpf.h>\n#include "maps.h"\n' + "".join(
    f'BPF_TABLE("array", __u32, struct {name}, layout_{name}, 1);\n' for name in M.RECORD_TYPES) + \
    "int xdp_layout_probe(struct xdp_md *ctx) { return XDP_PASS; }\n"

C_NAMES = {ct.c_uint32: ("unsigned int", "__u32"), ct.c_uint64: ("unsigned long long", "__u64"),
           M.HcTunnelDef: ("struct hc_tunnel",)}


def c_name(cls) -> tuple[str, ...]:
    """The C names a mirror may carry: struct flow_key for FlowKey, ... (C_NAMES: others)."""
    if cls in C_NAMES:
        return C_NAMES[cls]
    return ("struct " + "".join("_" + c.lower() if c.isupper() else c
                                for c in cls.__name__).lstrip("_"),)


def mismatches(b: btf.Btf, tid: int, mirror, what: str) -> list[str]:
    out = []
    if b.name(tid) not in c_name(mirror):
        out.append(f"{what}: compiled as {b.name(tid)}, mirrored by {mirror.__name__} "
                   f"({' or '.join(c_name(mirror))})")
    if b.sizeof(tid) != ct.sizeof(mirror):
        out.append(f"{what}: {b.sizeof(tid)} bytes compiled, {ct.sizeof(mirror)} mirrored")
    return out + [f"{what}: {d}" for d in
                  btf.diff(btf.ctypes_layout(mirror), b.layout(tid), b.name(tid))]


def check_maps(prog, mirrors: dict) -> list[str]:
    """Mismatches between a program's maps and `mirrors` ({map: (key, value)}); every
    map with BTF must be mirrored (bcc names its map descriptions ____btf_map_<name>)."""
    out, b = [], None
    for name, (key, val) in mirrors.items():
        b, kid, vid = btf.Btf.of_map(prog.map(name).map_fd)
        out += mismatches(b, kid, key, f"{name} key") + mismatches(b, vid, val, f"{name} value")
    compiled = {t.name.removeprefix("____btf_map_") for t in b.types
                if t is not None and t.kind == btf.STRUCT and t.name.startswith("____btf_map_")}
    out += [f"map {n} has no mirror in maps.py" for n in sorted(compiled - set(mirrors))]
    return out


def probe(bpf_dir) -> loader.Program:
    (bpf_dir / "layout_probe.c").write_text(PROBE_C)
    flags = [f if not f.startswith("-I") else f"-I{bpf_dir}" for f in OPTS.cflags()]
    return loader.Program("layout_probe.c", "xdp_layout_probe", flags)


@pytest.fixture
def bpf_copy(tmp_path, monkeypatch):
    """A private copy of bpf/ the loader compiles from (never edit the real one)."""
    d = tmp_path / "bpf"
    shutil.copytree(loader.BPF_DIR, d)
    monkeypatch.setattr(loader, "BPF_DIR", d)
    return d


def test_balancer_maps_match_mirrors(prog):
    assert check_maps(prog, M.MAP_TYPES) == []


def test_records_match_mirrors(bpf_copy):
    p = probe(bpf_copy)
    try:
        # the probe instantiates every map of maps.h too: checked once more from a copy
        out = check_maps(p, {**M.MAP_TYPES, **{f"layout_{n}": (ct.c_uint32, m)
                                                for n, m in M.RECORD_TYPES.items()}})
    finally:
        p.close()
    assert out == []


def test_hc_tunnel_maps_match_mirrors():
    h = loader.HcTunnel()
    try:
        out = []
        for name, (key, val) in M.HC_MAP_TYPES.items():
            b, kid, vid = btf.Btf.of_map(h.bpf[name.encode()].map_fd)
            out += mismatches(b, kid, key, f"{name} key") + mismatches(b, vid, val, f"{name} value")
    finally:
        h.bpf.cleanup()
    assert out == []


def test_reordered_field_is_caught(bpf_copy):
    """The check can fail: swap conn_val's first two fields in a copy of maps.h."""
    h = bpf_copy / "maps.h"
    src = h.read_text()
    a, b = "    __u32 real_id;", "    __u32 vip_id;"
    i, j = src.index(a, src.index("struct conn_val {")), src.index(b, src.index("struct conn_val {"))
    assert i < j, "conn_val no longer starts real_id, vip_id: pick two other fields"
    h.write_text(src[:i] + b + src[i + len(a):j] + a + src[j + len(b):])
    p = probe(bpf_copy)
    try:
        out = check_maps(p, M.MAP_TYPES)
    finally:
        p.close()
    assert any(o.startswith("conns value: struct conn_val: fields ['real_id', 'vip_id'")
               for o in out), out
    assert any("embryos value" in o and ".val" in o for o in out), out  # nested too


def test_numpy_and_struct_encoders_match_mirrors():
    """Encoders outside maps.py: the same offsets and sizes as the mirrors."""
    def fields(dt):
        return {n: (off, dt.fields[n][0].itemsize) for n, (_, off, *_) in dt.fields.items()}

    key, val = btf.ctypes_layout(M.FlowKey), btf.ctypes_layout(M.ConnVal)
    k = {f.name: (f.offset, f.size) for f in key}
    v = {f.name: (f.offset, f.size) for f in val}
    dst = k["dst"]
    want_key = {**k, "dst_hi": (dst[0], 8), "dst_lo": (dst[0] + 8, 8)}
    del want_key["dst"]
    assert fields(tables.FLOW_KEY_DTYPE) == want_key
    assert tables.FLOW_KEY_DTYPE.itemsize == ct.sizeof(M.FlowKey)
    for dt in (tables.CONN_VAL_DTYPE, translate._VAL_DT):
        assert fields(dt) == v and dt.itemsize == ct.sizeof(M.ConnVal)
    e = {f.name: f for f in btf.ctypes_layout(M.Embryo)}
    assert fields(tables.EMBRYO_DTYPE) == {
        "family": (e["key"].offset + k["family"][0], 1),
        "real_id": (e["val"].offset + v["real_id"][0], 4)}
    # CONN_KEY (struct module) by value: a mirror's bytes unpack to its fields.
    fk = M.flow_key("10.0.0.1", 1234, "10.0.0.2", 80, "udp")
    src, dst_, sport, dport, proto, fam = tables.CONN_KEY.unpack(bytes(fk))
    assert (src, dst_, sport, dport, proto, fam) == (bytes(fk.src), bytes(fk.dst), 1234, 80,
                                                    M.PROTO["udp"], M.FAMILY_V4)
    cv = M.ConnVal(real_id=7, vip_id=9, last_seen_ns=11)
    assert tables.CONN_VAL.unpack(bytes(cv)) == (7, 9, 11)
    assert np.frombuffer(bytes(cv), tables.CONN_VAL_DTYPE)[0].tolist() == (7, 9, 11)
