"""One compiled balancer for every BPF test module, and clean tables per test."""

import ctypes

import pytest

from l4lb.dataplane import loader, tables
from l4lb.dataplane import maps as M

OPTS = loader.BuildOptions(max_vips=16, max_reals=256, ring_max=65537, conn_table_size=65536)


@pytest.fixture(scope="session")
def prog():
    p = loader.compile_balancer(OPTS)
    yield p
    p.close()


def reset_flow_guard(prog):
    """Default guard, and a fresh window on every CPU."""
    loader.set_flow_guard(prog.map("flow_guard_cfg"), 0)
    g = prog.map("flow_guard")
    g[ctypes.c_int(0)] = g.Leaf()


@pytest.fixture
def st(prog):
    t = tables.ServiceTables(prog, OPTS)
    t.set_config(tun_src4="10.99.0.21", tun_src6="fd99::21")
    t.reset_global_counters()
    t.conns.clear()
    loader.clear_embryos(prog.map("embryos"))
    reset_flow_guard(prog)
    yield t
    for key in list(t.vips):
        t.delete_vip(key)
    t.conns.clear()
    loader.clear_embryos(prog.map("embryos"))
    reset_flow_guard(prog)


@pytest.fixture(scope="session")
def flow_events(prog):
    """flow_events() returns the flow events pushed since its last call (bcc opens a
    ring buffer once per program, so one consumer serves every test)."""
    got = []
    prog.bpf[b"flow_events"].open_ring_buffer(lambda ctx, data, size: got.append(
        M.FlowEvent.from_buffer_copy((ctypes.c_ubyte * size).from_address(data))))

    def take():
        prog.bpf.ring_buffer_poll(50)
        out = list(got)
        got.clear()
        return out
    return take
