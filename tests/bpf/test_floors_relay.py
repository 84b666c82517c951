"""bpf/floors.c's xdp_relay, the "XDP hop floor" of bench/throughput.py: VIP frames
addressed to us leave to the real's MAC with ours as source; everything else passes."""

import pytest

from bench import pps, throughput
from l4lb.dataplane import loader, testrun

VIP, OTHER = "10.99.0.102", "10.99.0.103"
OWN, REAL = "02:99:00:00:14:17", "02:99:00:00:1e:1f"


@pytest.fixture(scope="module")
def relay():
    p = loader.Program("floors.c", "xdp_relay", throughput.relay_cflags(VIP, OWN, REAL))
    yield p
    p.close()


def frame(dst: str, dmac: str = OWN) -> bytes:
    return pps.tcp_frame(bytes([10, 99, 0, 11]), bytes(int(x) for x in dst.split(".")),
                         40000, 5201, dmac=bytes.fromhex(dmac.replace(":", "")),
                         smac=bytes.fromhex("029900000b0b"))


def test_vip_frame_to_us_goes_to_the_real(relay):
    f = frame(VIP)
    r = testrun.test_run(relay.fd, f)
    assert r.verdict == "TX"
    assert r.data[:6].hex(":") == REAL and r.data[6:12].hex(":") == OWN
    assert r.data[12:] == f[12:]  # nothing but the MACs changes


@pytest.mark.parametrize("f", [frame(OTHER), frame(VIP, dmac="02:99:00:00:14:99"),
                               frame(VIP)[:20], bytes.fromhex("ffffffffffff" + "029900000b0b0806")
                               + bytes(28)])
def test_everything_else_passes_untouched(relay, f):
    r = testrun.test_run(relay.fd, f)
    assert r.verdict == "PASS" and r.data == f
