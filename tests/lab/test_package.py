"""What a user installs is the product: the wheel, built from this checkout and
installed into a throwaway venv, checks a config, starts a node that forwards
real traffic (DR and tunnel), runs the tunnel decapsulator on a real, and stops.
Nothing here imports l4lb from the checkout on the node's side. The lab (l4lb.lab:
namespaces, demo, traffic tools) stays in the checkout: the wheel must not carry it."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from l4lb.lab import Lab, wait_for

REPO = Path(__file__).resolve().parents[2]
VIP4, PORT_DR, PORT_TUN = "10.99.0.100", 9000, 9001


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    # Built from a clean copy: setuptools packs whatever an earlier build left in build/lib
    # (a stale l4lb/lab.py would ship the lab), and other runs may build in the checkout.
    src = work / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(work / "dist"), str(src)], check=True, capture_output=True,
                   text=True, timeout=300)
    (whl,) = (work / "dist").glob("l4lb-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel) -> Path:
    whl = wheel
    env = wheel.parent.parent / "venv"
    # --system-site-packages: bcc comes from Debian's python3-bpfcc, not from PyPI
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(env)],
                   check=True, timeout=120)
    r = subprocess.run([str(env / "bin/pip"), "install", "-q", str(whl)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return env


def test_wheel_carries_bpf_sources_and_imports_from_the_venv(venv):
    r = subprocess.run([str(venv / "bin/python"), "-c",
                        "import l4lb; from l4lb.dataplane import loader; "
                        "print(l4lb.__file__); print(loader.BPF_DIR); "
                        "print(sorted(p.name for p in loader.BPF_DIR.iterdir()))"],
                       capture_output=True, text=True, cwd="/", check=True)
    where, bpf_dir, files = r.stdout.splitlines()
    assert where.startswith(str(venv)), where
    assert bpf_dir.startswith(str(venv)), bpf_dir
    for name in ("balancer.c", "decap.c", "maps.h", "parse.h", "encap.h", "csum.h"):
        assert name in files


def test_wheel_carries_every_module_of_the_checkout_but_the_lab(venv, wheel):
    """A subpackage missing from pyproject's list would be left out of the wheel; the lab
    is left out on purpose, and nothing the wheel ships may import it."""
    names = zipfile.ZipFile(wheel).namelist()
    assert "l4lb/cli.py" in names
    assert not [n for n in names if n.startswith("l4lb/lab/")], "the wheel ships l4lb/lab"
    mods = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in (REPO / "l4lb").rglob("*.py")
                  if "bpf" not in p.parts and p.parent != REPO / "l4lb" / "lab")
    assert "l4lb.cli" in mods and not [m for m in mods if m.startswith("l4lb.lab")]
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    r = subprocess.run([str(venv / "bin/python"), "-c", code, *mods], capture_output=True,
                       text=True, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(venv / "bin/python"), "-c", "import l4lb.lab"], capture_output=True,
                       text=True, cwd="/")
    assert r.returncode != 0 and "No module named 'l4lb.lab'" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("args", [["up"], ["down"], ["status", "--json"]])
def test_installed_lab_command_points_to_the_checkout(venv, args):
    """`l4lb lab ...` from the wheel: one clear line and exit 2, not a traceback."""
    r = subprocess.run([str(venv / "bin/l4lb"), "lab", *args], capture_output=True, text=True,
                       cwd="/", timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("l4lb: error: the lab ships with the source checkout"), lines
    assert "make demo" in lines[0] and r.stdout == ""


def test_installed_node_checks_starts_forwards_and_stops(venv):
    l4lb = str(venv / "bin/l4lb")
    with Lab("tpkg", clients=1, balancers=1, reals=2) as lab:
        reals = lab.by_role("real")
        for r in reals:
            lab.start_echo(r.name, PORT_DR)
            lab.start_echo(r.name, PORT_TUN)
            lab.run(r.name, [l4lb, "decap", "--iface", "eth0", "--mode", "generic"])  # the installed decapsulator
        cfg = lab.balancer_config("lb1", [
            {"address": VIP4, "port": PORT_DR, "mode": "dr",
             "real": [{"address": r.ipv4} for r in reals]},
            {"address": VIP4, "port": PORT_TUN, "mode": "tun",
             "real": [{"address": r.ipv4} for r in reals]}])
        path = lab.write_config("lb1", cfg)
        sock = lab.api_socket("lb1")
        svc = lab.popen("lb1", [l4lb, "start", "-c", str(path)], log_name="lb1-installed.log")

        def ready():
            assert svc.alive, svc.output()[-2000:]
            return lab.run("lb1", [l4lb, "status", "--json", "--socket", sock],
                           check=False).returncode == 0

        wait_for(ready, 90, interval=0.3, what="the installed l4lb to answer")
        st = json.loads(lab.run("lb1", [l4lb, "status", "--json", "--socket", sock]).stdout)
        assert st["xdp_attached"] == {"eth0": True}
        chk = lab.run("lb1", [l4lb, "check", "-c", str(path)], check=False)
        assert chk.returncode == 0, chk.stderr
        for port in (PORT_DR, PORT_TUN):
            res = lab.client("client1", ["spread", f"{VIP4}:{port}", "--count", "40"])
            assert res["ok"] == 40, res
            assert set(res["reals"]) == {r.name for r in reals}, res
        lab.run("lb1", [l4lb, "stop", "--socket", sock])
        wait_for(lambda: not svc.alive, 30, what="the installed daemon to stop")
        assert not Path(st["pin_dir"]).exists()
