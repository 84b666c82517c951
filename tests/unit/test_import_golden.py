"""`l4lb import` on every Debian keepalived sample and on the paper's configs, against golden files.

Each case writes tests/import_vectors/golden/<case>.toml (the converted config)
and <case>.report (the report lines). Regenerate after an intended change with

    L4LB_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_import_golden.py

and review the diff (git diff tests/import_vectors/golden) before committing.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from l4lb.config import config_from_dict
from l4lb.importer import Options, import_files
from l4lb.importer.keepalived import Stmt, parse_file
from l4lb.importer.report import UNSUPPORTED, Report

VECTORS = Path(__file__).resolve().parent.parent / "import_vectors"
GOLDEN = VECTORS / "golden"
SAMPLES = sorted(p.name for p in (VECTORS / "keepalived-samples").iterdir() if p.name.startswith("keepalived.conf"))
REGEN = os.environ.get("L4LB_REGEN_GOLDEN") == "1"

# Case name -> (files under import_vectors, options)
CASES: dict[str, tuple[list[str], Options]] = {
    s: ([f"keepalived-samples/{s}"], Options()) for s in SAMPLES
}
# The conditional sample is meant to run with `keepalived -i high` (or low).
CASES["keepalived.conf.conditional_conf"] = (["keepalived-samples/keepalived.conf.conditional_conf"],
                                             Options(config_id="high"))
CASES["keepalived.conf.conditional_conf-low"] = (["keepalived-samples/keepalived.conf.conditional_conf"],
                                                 Options(config_id="low"))
CASES["paper-lb01"] = (["paper/lb01-keepalived.conf", "paper/haproxy.cfg"], Options(node="lb01"))
CASES["paper-lb02"] = (["paper/lb02-keepalived.conf", "paper/haproxy.cfg"], Options(node="lb02"))
CASES["paper-haproxy-only"] = (["paper/haproxy.cfg"], Options(node="lb01", vips=["192.168.1.100"]))


def test_every_debian_sample_is_a_case():
    assert len(SAMPLES) == 25  # what Debian 12's keepalived 2.2.7 ships
    assert set(SAMPLES) <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case):
    files, opts = CASES[case]
    res = import_files([str(VECTORS / f) for f in files], opts, root=VECTORS)
    report = "\n".join(res.report.lines()) + "\n"
    toml_path, report_path = GOLDEN / f"{case}.toml", GOLDEN / f"{case}.report"
    if REGEN:
        toml_path.write_text(res.text)
        report_path.write_text(report)
    assert res.text == toml_path.read_text(), f"{case}: output differs from {toml_path}"
    assert report == report_path.read_text(), f"{case}: report differs from {report_path}"
    # The golden file itself is a valid l4lb config.
    config_from_dict(tomllib.loads(toml_path.read_text()), source=str(toml_path))


# Keywords whose value lands in the output exactly (so they need no report line).
MAPPED = {
    "global_defs", "router_id", "vrrp_script", "script", "interval", "weight", "rise", "fall",
    "vrrp_instance", "interface", "virtual_router_id", "priority", "advert_int", "version",
    "authentication", "auth_type", "auth_pass", "unicast_src_ip", "unicast_peer", "virtual_ipaddress",
    "nopreempt", "preempt", "preempt_delay", "track_script", "track_interface", "garp_master_repeat",
    "garp_master_refresh", "accept", "no_accept", "virtual_server", "virtual_server_group", "delay_loop",
    "protocol", "real_server", "connect_port", "connect_timeout", "retry", "nb_get_retry", "url", "path",
    "status_code", "virtualhost", "misc_path", "misc_timeout", "TCP_CHECK", "HTTP_GET", "SSL_GET",
    "MISC_CHECK", "vrrp_version", "vrrp_garp_master_repeat", "vrrp_garp_master_refresh",
}
LIST_BLOCKS = {"virtual_ipaddress", "unicast_peer", "track_script", "track_interface", "virtual_server_group"}


def _unreported(stmts: list[Stmt], reported: set[tuple[str, int]], dropped: set[tuple[str, int]],
                parent: str = "") -> list[str]:
    out = []
    for st in stmts:
        here = (st.loc.file, st.loc.line)
        if here in dropped:
            continue  # reported as dropped, with everything inside its block
        if parent in LIST_BLOCKS:
            pass  # data lines: addresses, names
        elif st.keyword not in MAPPED:
            if here not in reported:
                out.append(f"{st.loc}: {st.text()}")
            continue  # a dropped block is reported once, at its first line
        if st.children:
            out += _unreported(st.children, reported, dropped, st.keyword)
    return out


@pytest.mark.parametrize("sample", SAMPLES)
def test_no_silent_drop(sample):
    """Every keepalived statement is either mapped exactly or named in the report at its line."""
    path = VECTORS / "keepalived-samples" / sample
    opts = CASES[sample][1]
    res = import_files([str(path)], opts, root=VECTORS)
    reported = {(f.loc.file, f.loc.line) for f in res.report.findings if f.loc}
    dropped = {(f.loc.file, f.loc.line) for f in res.report.findings if f.loc and f.kind == UNSUPPORTED}
    parsed = parse_file(path, Report(), config_id=opts.config_id, root=VECTORS)
    assert _unreported(parsed.stmts, reported, dropped) == []
    skipped = {(s.loc.file, s.loc.line) for s in parsed.skipped}
    assert skipped <= reported  # conditional lines left out are reported too
