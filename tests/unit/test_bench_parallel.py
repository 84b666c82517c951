"""bench/pps_parallel.py's and bench/throughput.py's pure helpers. No BPF, no root."""

from __future__ import annotations

import pytest

from bench import pps, pps_parallel, throughput
from l4lb.dataplane import maps as M


def test_prefill_records_are_flow_keys_no_phase_sends():
    keys, vals = pps_parallel.prefill_records(3, 1000)
    assert len(keys) == 3 * 40 and len(vals) == 3 * 16
    want = bytes(M.flow_key("10.240.3.233", 40000, "10.200.0.100", 80, "tcp"))  # 0x0af00000+1001
    assert keys[40:80] == want
    # distinct keys, and none from a series the phases send (10.<series + 1>.0.1 ...)
    assert len({keys[i:i + 40] for i in range(0, len(keys), 40)}) == 3
    assert keys[0] == 10 and keys[1] == 240 and pps.client_base(4, 238) == "10.239.0.1"


def test_summary_ratios_and_rows():
    per_pkt = {"common/room/new_single": [600.0, 640.0, 620.0],
               "common/room/new_parallel": [700.0, 660.0, 680.0],
               "percpu/room/new_single": [500.0, 520.0, 510.0],
               "percpu/room/new_parallel": [510.0, 530.0, 520.0]}
    duty = {k: [0.25, 0.3, 0.2] for k in per_pkt}
    s = pps_parallel.summarize(per_pkt, duty, {"rounds": 3})
    assert s["cases"]["common/room/new_single"] == {"min_ns": 600.0, "median_ns": 620.0,
                                                    "max_ns": 640.0, "duty": 0.25}
    assert s["parallel_over_single"] == {"common/room/new": round(680 / 620, 3),
                                         "percpu/room/new": round(520 / 510, 3)}
    rows = pps_parallel.table_rows(s)
    assert [r[0] for r in rows] == ["common LRU, room", "percpu LRU, room"]
    assert rows[0][2:5] == ["620 (600-640)", "680 (660-700)", "1.10"]


def test_counter_check_names_what_went_wrong():
    before = {"conn_promoted": 0, "conn_miss": 0}
    pps_parallel.check_counters(pps, "new", "room", before,
                                {"conn_promoted": 10, "conn_miss": 10}, 10)
    with pytest.raises(pps.BenchError, match="conn_guard_limited"):
        pps_parallel.check_counters(pps, "new", "full", before,
                                    {"conn_promoted": 10, "conn_miss": 10,
                                     "conn_guard_limited": 2}, 10)
    with pytest.raises(pps.BenchError, match="expected"):
        pps_parallel.check_counters(pps, "hit", "room", {"conn_hit": 0}, {"conn_hit": 9}, 10)


def test_parallel_arguments_are_bounded():
    with pytest.raises(SystemExit):
        pps.parse_args(["--parallel", "--parallel-flows", "0"])
    with pytest.raises(SystemExit):
        pps.parse_args(["--parallel", "--rounds", "21"])
    a = pps.parse_args(["--parallel", "--quick"])
    assert a.parallel_flows == 2000 and a.parallel_table == M.DEFAULT_CONN_TABLE_SIZE


def test_relay_macs_and_paths():
    assert throughput.mac_bytes("02:99:00:00:14:17") == "0x02,0x99,0x00,0x00,0x14,0x17"
    # every VIP path has its own middle node and VIP; direct has neither
    vias = [v for v in throughput.PATHS.values() if v[1]]
    assert len({n for n, _ in vias}) == len(vias) == len(throughput.VIPS) == 4
    assert throughput.PATHS["direct"] == (None, None)


def test_chain_shares_reads_perf_script_call_graphs():
    xdp = ("iperf3 \n\tffff1 __pi_memcpy\n\tffff2 skb_copy_bits\n\tffff3 __pskb_pull_tail\n"
           "\tffff4 do_xdp_generic\n\tffff5 net_rx_action\n")
    prog = "iperf3 \n\tffff6 bpf_prog_0123_xdp_balancer\n\tffff7 do_xdp_generic\n"
    tcp_pull = "iperf3 \n\tffff1 __pi_memcpy\n\tffff3 __pskb_pull_tail\n\tffff8 tcp_v4_rcv\n"
    other = "python3 \n\tffff1 __pi_memcpy\n\tffff4 do_xdp_generic\n"
    s = throughput.chain_shares("\n".join([xdp, prog, tcp_pull, other, xdp]))
    assert s["samples"] == 4  # python3's sample is not iperf3's
    assert s["xdp_generic_percent"] == 75.0
    assert s["linearise_percent"] == 50.0  # TCP's own pull is not XDP's linearisation
    assert s["bpf_prog_percent"] == 25.0
    assert s["top"][0] == [75.0, "__pi_memcpy"]
    assert throughput.chain_shares("")["samples"] == 0
