"""`make demo` in its fast mode: the summary a newcomer sees must hold up."""

import json
import subprocess
import sys

from l4lb.lab import lab_namespaces


def test_demo_fast(tmp_path):
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "l4lb.lab.demo", "--fast", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["answered"] == s["requests"] > 0          # all requests answered
    assert s["failover_outage_ms"] is not None           # the outage was measured
    assert 0 < s["failover_outage_ms"] < 3000
    assert s["long_lived_alive"] == s["long_lived_total"]  # long-lived connections alive
    assert s["namespaces_left"] == 0 and lab_namespaces("demo") == []
    assert "Summary" in r.stdout and "failover outage" in r.stdout
