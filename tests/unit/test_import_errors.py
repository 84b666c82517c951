"""`l4lb import` on bad input: a clear error naming file:line, exit code 1, nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from l4lb.cli import app
from l4lb.importer import ImportFailed, Options, import_files
from l4lb.importer.cli import run

GOOD_KA = """vrrp_instance VI_1 {
    interface eth0
    virtual_router_id 51
    virtual_ipaddress {
        10.0.0.100/24
    }
}
"""


def convert_cli(tmp_path: Path, capsys, files: list[str]) -> tuple[int, str]:
    out = tmp_path / "out.toml"
    rc = run(files, node=None, interfaces=[], config_id=None, vips=[], output=str(out))
    err = capsys.readouterr().err
    if rc != 0:
        assert not out.exists(), "a failed import must not write the output"
    return rc, err


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


@pytest.mark.parametrize("name,content,expect", [
    ("image.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", r"image\.png:1: binary data"),
    ("latin1.conf", "priorit\xe9 100\n".encode("latin-1"), r"latin1\.conf:1: not UTF-8"),
    ("notes.txt", "hello world\nthis is not a config\n", r"notes\.txt:1: 'hello' starts neither"),
    ("cfg.toml", "[node]\nname = \"lb1\"\n", r"cfg\.toml:1: '\[node\]' starts neither"),
    ("empty.conf", "# only a comment\n\n", r"empty\.conf: no configuration statements"),
])
def test_not_a_config(tmp_path, capsys, name, content, expect):
    rc, err = convert_cli(tmp_path, capsys, [write(tmp_path, name, content)])
    assert rc == 1
    assert re.search(expect, err), err


@pytest.mark.parametrize("text,line,msg", [
    (GOOD_KA.replace("    }\n}", "    }\n"), 1, "'{' of vrrp_instance is never closed"),
    (GOOD_KA + "}\n", 8, "unbalanced '}'"),
    (GOOD_KA.replace("virtual_router_id 51", "virtual_router_id 51 }"), 3, ""),  # closes early: stray } at 7
    ("{\n" + GOOD_KA, 1, "'{' without a keyword"),
    (GOOD_KA.replace("interface eth0", 'interface "eth0'), 2, "unterminated \" quote"),
])
def test_unbalanced(tmp_path, capsys, text, line, msg):
    f = write(tmp_path, "k.conf", text)
    rc, err = convert_cli(tmp_path, capsys, [f])
    assert rc == 1
    assert re.search(r"k\.conf:\d+: ", err), err
    if msg:
        assert f"k.conf:{line}: {msg}" in err, err
    else:
        assert "unbalanced '}'" in err


@pytest.mark.parametrize("text,expect", [
    (GOOD_KA.replace("vrrp_instance", "vrrp_instanse"),
     "k.conf:1: 'vrrp_instanse' is not a keepalived top-level keyword"),
    (GOOD_KA + "vrrp_scrpit chk {\n script /bin/true\n}\n",
     "k.conf:8: unknown top-level keyword 'vrrp_scrpit'; did you mean 'vrrp_script'?"),
    (GOOD_KA.replace("interface eth0", "interface eth0\n    priorty 100"),
     "k.conf:3: unknown keyword 'priorty' in vrrp_instance VI_1; did you mean 'priority'?"),
])
def test_unknown_keepalived_keyword(tmp_path, capsys, text, expect):
    rc, err = convert_cli(tmp_path, capsys, [write(tmp_path, "k.conf", text)])
    assert rc == 1
    assert expect in err, err


def test_unknown_haproxy_keyword(tmp_path, capsys):
    f = write(tmp_path, "h.cfg", "frontend f\n    bind 10.0.0.1:80\n    default_backend b\n"
                                 "backend b\n    balanse roundrobin\n    server s 10.0.0.2:80\n")
    rc, err = convert_cli(tmp_path, capsys, [f])
    assert rc == 1
    assert "h.cfg:5: unknown keyword 'balanse' in backend section; did you mean 'balance'?" in err


def test_haproxy_line_outside_a_section(tmp_path, capsys):
    f = write(tmp_path, "h.cfg", "    bind 10.0.0.1:80\nfrontend f\n")
    rc, err = convert_cli(tmp_path, capsys, ["haproxy", f])  # format named: no detection
    assert rc == 1
    assert "h.cfg:1: 'bind' outside any section" in err


def test_include_loop(tmp_path, capsys):
    write(tmp_path, "conf.d/b.conf", "include ../a.conf\n")
    a = write(tmp_path, "a.conf", GOOD_KA + "include conf.d/*.conf\n")
    rc, err = convert_cli(tmp_path, capsys, [a])
    assert rc == 1
    assert "conf.d/b.conf:1: include ../a.conf: include loop" in err, err


def test_include_self(tmp_path, capsys):
    a = write(tmp_path, "a.conf", "include a.conf\n" + GOOD_KA)
    rc, err = convert_cli(tmp_path, capsys, [a])
    assert rc == 1
    assert "a.conf:1: include a.conf: include loop" in err


def test_include_pointing_nowhere(tmp_path, capsys):
    a = write(tmp_path, "a.conf", GOOD_KA + "include /nonexistent-l4lb-test/*.conf\n")
    rc, err = convert_cli(tmp_path, capsys, [a])
    assert rc == 1
    assert "a.conf:8: include /nonexistent-l4lb-test/*.conf: no file matches" in err


def test_include_of_a_directory(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    a = write(tmp_path, "a.conf", GOOD_KA + "include d\n")
    rc, err = convert_cli(tmp_path, capsys, [a])
    assert rc == 1
    assert "a.conf:8: include d:" in err and "is a directory" in err


def test_missing_input_file(tmp_path, capsys):
    rc, err = convert_cli(tmp_path, capsys, [str(tmp_path / "nope.conf")])
    assert rc == 1
    assert "cannot read" in err and "nope.conf" in err


def test_two_keepalived_files_are_two_nodes(tmp_path, capsys):
    a = write(tmp_path, "a.conf", GOOD_KA)
    b = write(tmp_path, "b.conf", GOOD_KA)
    rc, err = convert_cli(tmp_path, capsys, [a, b])
    assert rc == 1
    assert "a second keepalived file" in err


def test_bad_values_are_errors_with_lines(tmp_path, capsys):
    text = GOOD_KA.replace("virtual_router_id 51", "virtual_router_id 300").replace(
        "10.0.0.100/24", "10.0.0.300/24")
    rc, err = convert_cli(tmp_path, capsys, [write(tmp_path, "k.conf", text)])
    assert rc == 1
    assert "k.conf:3: virtual_router_id 300: expected a number in 1..255" in err
    assert "k.conf:5: virtual_ipaddress 10.0.0.300/24: not a unicast address" in err


def test_failure_leaves_an_existing_output_alone(tmp_path):
    out = tmp_path / "out.toml"
    out.write_text("# the old config\n")
    bad = write(tmp_path, "k.conf", GOOD_KA + "}\n")
    res = CliRunner().invoke(app, ["import", bad, "-o", str(out)])
    assert res.exit_code == 1
    assert "k.conf:8: unbalanced '}'" in res.output
    assert out.read_text() == "# the old config\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.toml")] == []  # no temp left


def test_success_through_the_cli(tmp_path):
    out = tmp_path / "out.toml"
    f = write(tmp_path, "k.conf", GOOD_KA)
    res = CliRunner().invoke(app, ["import", "keepalived", f, "--node", "lb1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    check = CliRunner().invoke(app, ["check", "-c", str(out), "--no-system"])
    assert check.exit_code == 0, check.output


def test_bad_options():
    f = str(Path(__file__).resolve().parent.parent / "import_vectors" / "paper" / "haproxy.cfg")
    with pytest.raises(ImportFailed, match="--vip"):
        import_files([f], Options(vips=["not-an-ip"]))
    with pytest.raises(ImportFailed, match="--node 'lb 1'"):
        import_files([f], Options(node="lb 1", vips=["10.0.0.1"]))
    with pytest.raises(ImportFailed, match="--interface"):
        import_files([f], Options(interfaces=["a/b"], vips=["10.0.0.1"]))


def test_mutated_inputs_never_crash(tmp_path):
    """Samples with lines deleted, words replaced, junk inserted: a result or ImportFailed, never a traceback."""
    import random

    vectors = Path(__file__).resolve().parent.parent / "import_vectors"
    files = sorted((vectors / "keepalived-samples").iterdir()) + sorted((vectors / "paper").iterdir())
    junk = ["{", "}", '"', "'", "#", "!", "@x", "$A", "${A}", "include x", "-1", "99999", "0", "::",
            "1.2.3.4", "fd00::1/64", "weight", "\\", "*:80", "check", ":", "$A=b \\"]
    rnd = random.Random(15)
    converted = failed = 0
    for _ in range(300):
        f = rnd.choice(files)
        lines = f.read_text().splitlines()
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(lines))
            op = rnd.random()
            if op < 0.3:
                del lines[i]
            elif op < 0.6 and lines[i].split():
                w = lines[i].split()
                w[rnd.randrange(len(w))] = rnd.choice(junk)
                lines[i] = " ".join(w)
            else:
                lines.insert(i, f"{rnd.choice(junk)} {rnd.choice(junk)}")
        p = tmp_path / ("x.cfg" if f.suffix == ".cfg" else "x.conf")
        p.write_text("\n".join(lines) + "\n")
        try:
            import_files([str(p)], Options(node="lb1"), root=tmp_path)
            converted += 1
        except ImportFailed as e:
            assert all(line.strip() for line in e.errors)
            failed += 1
    assert converted > 30 and failed > 30  # both outcomes were exercised


def test_what_l4lb_refuses_is_an_error_at_the_input_line(tmp_path, capsys):
    two = GOOD_KA + GOOD_KA.replace("VI_1", "VI_2").replace("10.0.0.100", "10.0.0.101")
    rc, err = convert_cli(tmp_path, capsys, [write(tmp_path, "k.conf", two)])
    assert rc == 1
    assert "k.conf:8: l4lb refuses the result: vrrp[1].vrid: 51 on eth0 (IPv4) is already used" in err, err
