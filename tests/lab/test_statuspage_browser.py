"""The status page in a real browser: headless Debian chromium, driven by selenium
through chromedriver, both inside the balancer's namespace (the page is served on
127.0.0.1 there, where the metrics listen). The page renders the VIP and its reals,
shows traffic as packets/s and new flows/s, and a real taken down shows DOWN within
its health-check fall time, by the page's own refresh (no reload); status.json
agrees."""

import ctypes
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.remote.command import Command

from l4lb.lab import Lab, wait_for

PORT = 9100
VIP = f"10.99.0.100:{PORT}/udp"
HC = {"type": "tcp", "interval_s": 0.5, "timeout_s": 0.4, "rise": 2, "fall": 3}
FALL_TIME_S = HC["interval_s"] * HC["fall"] + HC["timeout_s"]  # 3 failed checks
REFRESH_S = 0.5
PAGE = f"http://127.0.0.1:9541/?refresh={REFRESH_S}"
DRIVER_PORT = 9515
CLONE_NEWNET = 0x40000000


def vips(lab):
    # UDP VIP; the tcp health check probes the echo server's TCP side of the port.
    return [{"address": "10.99.0.100", "port": PORT, "protocol": "udp",
             "real": [{"address": r.ipv4} for r in lab.by_role("real")]}]


@pytest.fixture(scope="module")
def lab():
    with Lab("tsp", clients=1, balancers=1, reals=2) as lab:
        lab.echo = {r.name: lab.start_echo(r.name, PORT) for r in lab.by_role("real")}
        lab.daemon = lab.start_l4lb("lb1", lab.balancer_config("lb1", vips(lab), healthcheck=HC))
        wait_for(lambda: all(r["state"] == "UP" for r in status_json(lab)["vips"][0]["reals"]),
                 15, what="reals up")
        yield lab


def status_json(lab) -> dict:
    r = lab.run("lb1", ["curl", "-sS", "--fail", "--max-time", "5",
                        "http://127.0.0.1:9541/status.json"])
    return json.loads(r.stdout)


def _enter_netns(path: str) -> None:
    """setns(2) for the calling thread only: its sockets and the processes it starts
    (chromedriver, and so chromium) live in the namespace; the rest of pytest not."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Browser:
    """A selenium session whose every call runs on one thread inside the netns."""

    def __init__(self, lab, node: str):
        self.pool = ThreadPoolExecutor(1, initializer=_enter_netns,
                                       initargs=(lab.node(node).nspath,))
        self.driver = None

    def call(self, fn, *args, timeout: float = 60):
        return self.pool.submit(fn, *args).result(timeout)

    def start(self, lab) -> None:
        svc = lab.popen("lb1", ["/usr/bin/chromedriver", f"--port={DRIVER_PORT}"],
                        log_name="chromedriver.log")
        lab.wait_listening(svc, DRIVER_PORT)
        opts = Options()
        opts.binary_location = "/usr/bin/chromium"
        for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", f"--user-data-dir={lab.workdir / 'chromium'}"):
            opts.add_argument(a)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = self.call(lambda: webdriver.Remote(f"http://127.0.0.1:{DRIVER_PORT}",
                                                         options=opts), timeout=90)

    def page(self) -> dict:
        """What the browser shows now: states by real, the VIP line's rates, etc."""
        return self.call(self.driver.execute_script, READ_PAGE, timeout=20)

    def quit(self) -> None:
        try:
            if self.driver is not None:
                self.call(self.driver.quit, timeout=30)
        finally:
            self.pool.shutdown(wait=True)


READ_PAGE = """
function num(el) { if (!el) return null; var t = el.textContent.replace(/,/g, "");
                   return t === "\\u2013" ? null : Number(t); }
var out = {title: document.title, note: document.getElementById("note").textContent,
           mark: window.__l4lb_mark || null, vips: {}};
document.querySelectorAll("p.vip").forEach(function (p) {
  var v = {pps: num(p.querySelector(".pps")), fps: num(p.querySelector(".fps")), reals: {}};
  var table = document.querySelector('table.reals[data-vip="' + p.getAttribute("data-vip") + '"]');
  var heads = Array.prototype.map.call(table.querySelectorAll("th"),
                                       function (th) { return th.textContent; });
  table.querySelectorAll("tr[data-real]").forEach(function (tr) {
    var cells = tr.querySelectorAll("td"), r = {};
    heads.forEach(function (h, i) { r[h] = cells[i].textContent; });
    r.pps = num(cells[heads.indexOf("packets/s")]);
    r.color = getComputedStyle(cells[heads.indexOf("state")]).backgroundColor;
    v.reals[tr.getAttribute("data-real")] = r;
  });
  out.vips[p.getAttribute("data-vip")] = v;
});
return out;
"""


@pytest.fixture(scope="module")
def browser(lab):
    b = Browser(lab, "lb1")
    try:
        b.start(lab)
        yield b
    finally:
        b.quit()


def udp_flows(lab, seconds: float, per_s: int):
    """New flows from client1 to the VIP: one datagram from a fresh socket each."""
    code = ("import socket, sys, time\n"
            "end, gap, port = time.monotonic() + float(sys.argv[1]), 1 / int(sys.argv[2]), "
            "int(sys.argv[3])\n"
            "while time.monotonic() < end:\n"
            "    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
            "        s.sendto(b'x' * 64, ('10.99.0.100', port))\n"
            "    time.sleep(gap)\n")
    return lab.popen("client1", [sys.executable, "-c", code, str(seconds), str(per_s),
                                 str(PORT)])


def test_the_page_renders_live_and_shows_a_downed_real_down_without_a_reload(lab, browser):
    r1, r2 = (lab.node(n).ipv4 for n in ("real1", "real2"))
    browser.call(browser.driver.get, PAGE)
    seen = wait_for(lambda: (p := browser.page())["vips"].get(VIP) and
                    len(p["vips"][VIP]["reals"]) == 2 and p, 15, interval=0.2,
                    what="the VIP and its reals rendered")
    assert lab.l4lb_name("lb1") in seen["title"]
    reals = seen["vips"][VIP]["reals"]
    assert {a: r["state"] for a, r in reals.items()} == {r1: "UP", r2: "UP"}
    assert {a: r["weight"] for a, r in reals.items()} == {r1: "100", r2: "100"}
    # two equal reals share the Maglev ring about evenly
    shares = [float(r["ring share"].rstrip("%")) for r in reals.values()]
    assert sum(shares) == pytest.approx(100.0, abs=0.2) and min(shares) > 40, shares
    # a mark in the window: a reload of the page would wipe it
    browser.call(browser.driver.execute_script, "window.__l4lb_mark = 'kept';")

    # traffic shows as rates, refreshed in place
    lab.run("client1", ["ping", "-c", "1", "-W", "2", "10.99.0.100"], check=False)  # ARP
    flows = udp_flows(lab, seconds=4, per_s=100)
    busy = wait_for(lambda: (v := browser.page()["vips"][VIP])["pps"] and v["fps"] and
                    all(r["pps"] for r in v["reals"].values()) and v, 15, interval=0.2,
                    what="packets/s and new flows/s on the page")
    assert 5 <= busy["pps"] <= 1000 and 5 <= busy["fps"] <= 1000, busy
    flows.proc.wait(30)

    # real2 taken down: DOWN on the page within the fall time (+ one refresh + slack)
    lab.echo["real2"].stop()
    t0 = time.monotonic()
    # DOWN and out of the ring: the verdict shows first, the new ring (filled in a
    # thread) goes live a few ms later, and a refresh can fall in between.
    down = wait_for(lambda: (p := browser.page())["vips"][VIP]["reals"][r2]["state"] == "DOWN"
                    and p["vips"][VIP]["reals"][r2]["ring share"] == "0.0%" and p, 15,
                    interval=0.05, what="real2 DOWN on the page, with no ring share")
    took = time.monotonic() - t0
    print(f"real2 DOWN on the page {took:.2f} s after its echo server stopped "
          f"(fall time {FALL_TIME_S:g} s, refresh {REFRESH_S:g} s)")
    assert took <= FALL_TIME_S + REFRESH_S + 1.5, took
    assert down["mark"] == "kept"  # no reload happened
    assert down["note"].startswith("live: refreshed"), down["note"]
    reals = down["vips"][VIP]["reals"]
    assert reals[r1]["state"] == "UP" and reals[r2]["ring share"] == "0.0%"
    assert reals[r1]["ring share"] == "100.0%"
    assert "tcp:" in reals[r2]["health check"] and "ok" not in reals[r2]["health check"]
    # the inline style applies (the CSP lets it): DOWN is red, UP green
    assert (reals[r2]["color"], reals[r1]["color"]) == ("rgb(244, 180, 180)",
                                                        "rgb(200, 240, 200)"), reals

    # status.json agrees with the page
    snap = status_json(lab)
    (v,) = snap["vips"]
    assert v["vip"] == VIP and v["reals_up"] == 1
    assert {r["address"]: (r["state"], r["ring_share"]) for r in v["reals"]} == \
        {r1: ("UP", 1.0), r2: ("DOWN", 0.0)}
    assert v["new_flows"] >= 100 and snap["conn_table"]["capacity"] == 65536

    # back up: the page follows again, still without a reload
    lab.echo["real2"] = lab.start_echo("real2", PORT)
    up = wait_for(lambda: (p := browser.page())["vips"][VIP]["reals"][r2]["state"] == "UP"
                  and p, 15, interval=0.1, what="real2 UP again on the page")
    assert up["mark"] == "kept"
    # the browser saw no errors (a CSP refusal or a script error would be logged)
    logs = browser.call(browser.driver.execute, Command.GET_LOG, {"type": "browser"})["value"]
    assert not [e for e in logs if e["level"] == "SEVERE"], logs
