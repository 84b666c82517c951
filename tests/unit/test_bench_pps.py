"""bench/pps.py's pure helpers: statistics, net, packets, report shape. No BPF, no root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, pps  # pyproject's pytest pythonpath puts the repository root on the path

ROOT = Path(__file__).resolve().parents[2]


def test_summarize_min_median_max():
    assert pps.summarize([130.04, 120.0, 150.0, 125.0, 140.0]) == {
        "min_ns": 120.0, "median_ns": 130.0, "max_ns": 150.0}
    assert pps.summarize([1.0, 2.0])["median_ns"] == 1.5
    with pytest.raises(ValueError):
        pps.summarize([])


def test_net_is_median_minus_xdp_pass_median():
    cases = {"xdp_pass": {"min_ns": 110.0, "median_ns": 120.0, "max_ns": 130.0},
             "dr_v4_established": {"min_ns": 180.0, "median_ns": 200.5, "max_ns": 210.0},
             "non_vip": {"min_ns": 130.0, "median_ns": 119.0, "max_ns": 160.0}}
    pps.add_net(cases)
    assert cases["xdp_pass"]["net_ns"] == 0.0
    assert cases["dr_v4_established"]["net_ns"] == 80.5
    assert cases["non_vip"]["net_ns"] == -1.0  # reported as measured, never clamped


def test_resolution_of_quantised_durations():
    quantised = [120, 121, 130, 131, 140, 141, 150, 160, 161, 170, 190]
    assert pps.resolution_ns(quantised) == 10
    assert pps.resolution_ns(list(range(100, 160, 3))) == 3
    assert pps.resolution_ns(list(range(100, 120))) == 1  # no grid coarser than a nanosecond
    assert pps.resolution_ns([130] * 5) == 0


def test_chunks_cover_the_round():
    assert pps.chunk_sizes(20000, 1000) == [1000] * 20
    assert pps.chunk_sizes(2500, 1000) == [1000, 1000, 500]
    assert sum(pps.chunk_sizes(12345, 777)) == 12345
    assert pps.chunk_sizes(10, 1000) == [10]
    with pytest.raises(ValueError):
        pps.chunk_sizes(0, 10)


def test_conn_table_never_fills():
    assert pps.conn_table_size_for(400_000, 1 << 20) == 1 << 20
    assert pps.conn_table_size_for(600_000, 1 << 20) == 1 << 21
    assert pps.conn_table_size_for(10, 1024) == 1024


def test_frames_are_realistic_and_checksummed():
    import ipaddress

    import scapy.all as scapy

    src4, dst4 = ipaddress.ip_address("10.1.0.1").packed, ipaddress.ip_address("10.200.0.100").packed
    f4 = pps.tcp_frame(src4, dst4, 40000, 80)
    assert len(f4) == 64
    p = scapy.Ether(f4)
    assert p[scapy.IP].src == "10.1.0.1" and p[scapy.TCP].dport == 80
    assert p[scapy.TCP].flags == "A" and p[scapy.IP].len == 50
    ip, tcp = p[scapy.IP].chksum, p[scapy.TCP].chksum
    del p[scapy.IP].chksum, p[scapy.TCP].chksum
    q = scapy.Ether(scapy.raw(p))
    assert (q[scapy.IP].chksum, q[scapy.TCP].chksum) == (ip, tcp)

    src6, dst6 = ipaddress.ip_address("fd00:1::1").packed, ipaddress.ip_address("fd00:200::100").packed
    f6 = pps.tcp_frame(src6, dst6, 40000, 443, flags=pps.TCP_SYN)
    assert len(f6) == 84
    p = scapy.Ether(f6)
    assert p[scapy.IPv6].dst == "fd00:200::100" and p[scapy.TCP].flags == "S"
    tcp = p[scapy.TCP].chksum
    del p[scapy.TCP].chksum
    assert scapy.Ether(scapy.raw(p))[scapy.TCP].chksum == tcp


def test_flow_series_are_distinct_and_same_length():
    frames = pps.flow_frames(pps.client_base(4, 3), "10.200.0.100", 80, 61_000, pps.TCP_SYN)
    assert len(frames) == 61_000 * 64
    tuples = {frames[i * 64 + 26:i * 64 + 36] for i in range(0, 61_000, 499)}  # saddr..ports
    assert len(tuples) == len(range(0, 61_000, 499))
    assert pps.flow_src("10.1.0.1", 60_000) == (bytes([10, 1, 0, 2]), 1024)
    assert pps.client_base(6, 0) != pps.client_base(6, 1)
    with pytest.raises(ValueError):
        pps.client_base(4, 250)


def test_vectorised_frames_equal_one_by_one():
    import ipaddress
    for base, dst in (("10.3.255.250", "10.200.0.100"), ("fd00:3::1", "fd00:200::100")):
        for flags in (pps.TCP_SYN, pps.TCP_ACK):
            n = 61_000  # crosses a source-address step (60,000 ports per address)
            frames = pps.flow_frames(base, dst, 80, n, flags)
            flen = len(frames) // n
            d = ipaddress.ip_address(dst).packed
            for i in (0, 1, 59_999, 60_000, n - 1):
                s, sport = pps.flow_src(base, i)
                assert frames[i * flen:(i + 1) * flen] == pps.tcp_frame(s, d, sport, 80, flags)
    with pytest.raises(ValueError):
        pps.flow_frames("255.255.255.255", "10.200.0.100", 80, 61_000, pps.TCP_SYN)


def test_floor_ratios():
    def case(net):
        return {"min_ns": 0.0, "median_ns": 0.0, "max_ns": 0.0, "net_ns": net}
    r = pps.floor_ratios({"dr_v4_established": case(46.0), "floor_dr": case(40.0),
                          "non_vip": case(10.0), "floor_parse": case(0.4),
                          "tun_v4_established": case(60.0)})
    assert r["dr_v4_established"] == {"floor": "floor_dr", "ratio": 1.15, "aim": 1.15,
                                      "met": True}
    assert r["non_vip"]["ratio"] is None and not r["non_vip"]["met"]  # floor within noise
    assert "tun_v4_established" not in r  # its floor did not run
    assert pps.floor_cell(r["dr_v4_established"]) == "1.15 (<= 1.15, ok)"


def test_expected_counter_deltas():
    c = pps.CASE_BY_NAME
    assert pps.expected_deltas(c["xdp_pass"], 10) == {}
    assert pps.expected_deltas(c["floor_new"], 10) == {}  # floors touch no balancer counter
    assert pps.expected_deltas(c["non_vip"], 10) == {"pass_non_vip": 10}
    assert pps.expected_deltas(c["tun_v4_new"], 7) == {"tx_tun": 7, "conn_miss": 7}
    assert pps.expected_deltas(c["dr_v6_established"], 5) == {"tx_dr": 5, "conn_hit": 5}
    assert pps.counter_deltas({"a": 1, "b": 2}, {"a": 1, "b": 5, "c": 1}) == {"b": 3, "c": 1}


def test_every_case_named_in_the_brief():
    names = [c.name for c in pps.CASES]
    assert names[0] == "xdp_pass"
    assert set(names) == {"xdp_pass", "xdp_tx_swap", "dr_v4_established",
                          "dr_v4_established_many", "dr_v4_new", "tun_v4_established",
                          "tun_v4_new", "dr_v6_established", "tun_v6_established", "dr_v6_new",
                          "non_vip", "dr_v4_established_1m", "floor_parse", "floor_dr",
                          "floor_tun", "floor_new", "floor_dr_1m"}
    # every floor a ratio names is a case of the same run
    assert {f for f, _ in pps.FLOOR_OF.values()} <= set(names)
    # repeat=N is only valid where the output run again is the same case
    assert not any(c.same_on_rerun for c in pps.CASES if c.flows != "one")
    # nor for any VIP case: the output is addressed to a real's MAC, not the balancer's
    assert not any(c.same_on_rerun for c in pps.CASES if c.vip)


def test_cli():
    a = pps.parse_args(["--quick"])
    assert a.quick and a.calls == pps.QUICK_CALLS and a.rounds == 5
    a = pps.parse_args(["--calls", "123", "--rounds", "3", "--cases", "non_vip"])
    assert a.calls == 123 and a.rounds == 3
    assert [c.name for c in a.case_list] == ["xdp_pass", "non_vip"]  # the baseline always runs
    with pytest.raises(SystemExit):
        pps.parse_args(["--cases", "nonsense"])
    with pytest.raises(SystemExit):
        pps.parse_args(["--rounds", "0"])


def _report():
    cases = {"xdp_pass": pps.summarize([120.0, 121.0, 119.0]),
             "dr_v4_established": pps.summarize([190.0, 200.0, 210.0]),
             "tun_v4_established": pps.summarize([300.0, 310.0, 305.0])}
    meta = common.run_meta(True, argv=["bench/pps.py", "--quick"])
    return pps.build_report(cases, pps.method_text(5000, 3, 1000, 1), meta,
                            {"cross_check_repeat": {"repeat": 10, "cases": {
                                "xdp_pass": {"median_ns": 30.0, "net_ns": 0.0}}}})


def test_report_json_shape():
    doc = json.loads(json.dumps(_report()))
    assert {"cases", "method", "kernel", "command", "quick", "timestamp"} <= doc.keys()
    assert doc["quick"] is True and "-m bench.pps --quick" in doc["command"]
    for v in doc["cases"].values():
        assert set(v) == {"min_ns", "median_ns", "max_ns", "net_ns"}
        assert all(isinstance(x, float) for x in v.values())
    assert doc["cases"]["dr_v4_established"]["net_ns"] == 80.0
    assert "repeat=1" in doc["method"]


def test_tables_show_targets_beside_figures(tmp_path):
    r = _report()
    text = pps.render_text(r)
    assert "dr_v4_established" in text and "<= 75 (over)" in text
    assert "186" in text  # Katran's figure beside ours
    md = pps.render_markdown(r)
    assert "| dr_v4_established |" in md and r["command"] in md
    common.write_json(tmp_path / "x" / "pps.json", r)
    assert json.loads((tmp_path / "x" / "pps.json").read_text())["cases"] == r["cases"]
    assert pps.target_cell("non_vip", 29.9) == "<= 30 (ok)"
    assert pps.target_cell("xdp_pass", 0.0) == ""


def test_common_helpers():
    t = common.text_table(["case", "ns"], [["a", "1.0"], ["long name", "10.5"]])
    lines = t.splitlines()
    assert lines[0].startswith("case") and lines[2].endswith(" 1.0") and len(lines) == 4
    # benches run as modules from the repository root: argv[0] is the script's path
    assert common.command_line(["bench/pps.py", "--json", "a b"], executable="/usr/bin/python3") \
        == "/usr/bin/python3 -m bench.pps --json 'a b'"
    assert common.command_line([str(ROOT / "bench" / "pps.py")],
                               executable=str(ROOT / ".venv/bin/python")) \
        == ".venv/bin/python -m bench.pps"
    assert common.command_line(["/elsewhere/x.py", "--quick"], executable="/usr/bin/python3") \
        == "/usr/bin/python3 /elsewhere/x.py --quick"
    s = common.cpu_snapshot("cpu  100 0 50 800 10 5 5 20 0 0\ncpu0 1 2 3\n")
    assert s["busy_s"] == pytest.approx(160 / common.os.sysconf("SC_CLK_TCK"))
    load = common.other_load({"busy_s": 10.0, "steal_s": 0.0, "idle_s": 0, "own_s": 1.0,
                              "wall_s": 100.0},
                             {"busy_s": 13.0, "steal_s": 0.5, "idle_s": 0, "own_s": 3.0,
                              "wall_s": 102.0})
    assert load == {"other_cpus_busy": 0.5, "steal_cpus": 0.25}
