#!/usr/bin/env bash
# tools/dev.sh - the README's two commands: install everything, build, then run.
#
#   bash tools/dev.sh demo    # system packages + venv + build, then the main job
#   bash tools/dev.sh test    # the same setup, then the whole test suite
#   bash tools/dev.sh setup   # only install and build
#
# Runs as root on Debian 12. Idempotent: a second run skips what is installed.
# Python packages go into ./.venv so a system Python marked "externally managed"
# (PEP 668) is never touched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[dev] %s\n' "$*" >&2; }

# clang: the fuzz build of the wire extension (make fuzz-build, docs/fuzzing.md)
# tmux: tests/test_top.py drives `mta top` in a terminal; chromium, chromium-driver: the
# dashboard's headless-browser test (tests/scenarios/test_dashboard.py, selenium);
# spamassassin, spamd, clamav-daemon: the egress scanning test starts its own spamd and clamd
# (tests/scenarios/test_scanning.py)
APT_PACKAGES=(build-essential python3-dev python3-venv liburing-dev zlib1g-dev swaks postfix procps clang
              tmux chromium chromium-driver spamassassin spamd clamav-daemon redis-server
              $(grep -hv '^#' tools/dns-packages.txt tools/dkim-packages.txt))

install_system() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || { echo "need root to apt-get install: ${missing[*]}" >&2; exit 1; }
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # postfix only for smtp-source/smtp-sink: "No configuration" keeps the
    # system instance unconfigured and off port 25.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d; printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    [ -n "$policy" ] && rm -f "$policy"
    return 0
}

install_python() {
    local py="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv"
        "$py" -m venv .venv
    fi
    if ! .venv/bin/python -c "import Cython, uvloop, orjson, pytest, aiosmtpd, hypothesis, atheris, dns, dkim, nacl, cryptography, ruff, aiohttp, jsonschema" 2>/dev/null; then
        log "pip install build and test requirements"
        .venv/bin/python -m pip install -q -r requirements-dev.txt
    fi
}

build() {
    log "building native extensions"
    .venv/bin/python setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(Compiling|\[|performance hint)" >&2 || true
    # The tree itself is the package (extensions built in place): put it on
    # the venv's path and give the venv an `mta` command.
    local site
    site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$ROOT" > "$site/mta-dev.pth"
    printf '#!/bin/sh\nexec "%s/.venv/bin/python" -m mta "$@"\n' "$ROOT" > .venv/bin/mta
    chmod 755 .venv/bin/mta
    .venv/bin/python -c "import mta._native.wire, mta._native.spool, mta._native.queues, mta._native.dkim" \
        || { echo "native build failed (see compiler output above)" >&2; exit 1; }
}

install_system
install_python
build
case "${1:-setup}" in
    setup) ;;
    demo) shift; exec .venv/bin/python tools/demo.py "$@" ;;
    test) shift; exec .venv/bin/python -m pytest -q tests "$@" ;;
    *) echo "usage: tools/dev.sh setup|demo|test" >&2; exit 2 ;;
esac
