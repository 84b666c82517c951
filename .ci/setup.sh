#!/usr/bin/env bash
# Idempotent machine setup for l4lb: Debian packages, kernel headers, the venv.
# Run by `make setup` (and so by `make test`). Safe to run again: it only does
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(python3-bpfcc bpfcc-tools python3-venv python3-pip iproute2 ethtool iperf3 wrk
      nginx-light haproxy keepalived tcpdump curl iputils-ping linux-headers-amd64 util-linux procps
      prometheus  # prometheus: promtool, for `promtool check metrics` in the tests
      frr  # frr: bgpd/bfdd/zebra for ECMP scale-out (the lab router and each balancer, in namespaces)
      chromium chromium-driver  # the status page opened in a headless browser (lab test)
      linux-perf)  # perf: bench/throughput.py --profile (where iperf3's time goes)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (apt-get, /lib/modules links); try: sudo make setup" >&2
    exit 2
fi

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    # Keep the packaged daemons (nginx, haproxy, keepalived, frr) from starting on the
    # host: the lab starts its own copies inside namespaces.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$created_policy" = 1 ] && rm -f "$policy"
    # The prometheus package is here for promtool only: its server must not start
    # at the next boot of a systemd host.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable prometheus >/dev/null 2>&1 || true
        systemctl disable frr >/dev/null 2>&1 || true
    fi
fi

# bcc needs kernel headers under /lib/modules/$(uname -r)/build. When the
# running kernel ships none, link Debian's newest generic headers instead.
kver=$(uname -r)
moddir=/lib/modules/$kver
if [ ! -e "$moddir/build/include" ] || [ ! -e "$moddir/source/include/linux/kconfig.h" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$hdr" ]; then
        echo "setup: no kernel headers found under /usr/src; install linux-headers-amd64" >&2
        exit 1
    fi
    # Debian splits headers: the arch part (-amd64, generated files) is "build",
    # the shared part (-common, include/linux/...) is "source"; bcc needs both.
    common=${hdr%-amd64}-common
    [ -d "$common" ] || common=$hdr
    echo "setup: linking $hdr as $moddir/build and $common as $moddir/source"
    mkdir -p "$moddir"
    ln -sfn "$hdr" "$moddir/build"
    ln -sfn "$common" "$moddir/source"
fi

# The venv must see Debian's bcc module, so it is made by the system python
# with --system-site-packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    echo "setup: creating .venv (system site packages, for bcc)"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing l4lb into .venv (editable, with test and bench extras)"
    log=$(mktemp)
    if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test,bench]'; } >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"
        echo "setup: pip install failed (see above)" >&2
        exit 1
    fi
    rm -f "$log"
    touch "$stamp"
fi
