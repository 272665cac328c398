#!/usr/bin/env bash
# Make a fresh machine ready: PostgreSQL 15 server binaries (and more Debian packages when asked for),
# a virtualenv in .venv with the project and its test extra. Safe to run again: it skips what is there.
#   scripts/bootstrap.sh            # PostgreSQL + venv
#   scripts/bootstrap.sh pgbouncer  # ... and extra Debian packages
#   scripts/bootstrap.sh bench      # ... and what `make bench` needs: pgbouncer and pgpool2
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

have_pg() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; }
if ! have_pg || ! command -v psql >/dev/null || ! command -v pgbench >/dev/null; then
    echo "bootstrap: installing PostgreSQL server packages"
    apt_install postgresql postgresql-contrib
    # Debian starts a cluster of its own on 5432; the project never uses it, so stop it to save memory.
    if command -v pg_ctlcluster >/dev/null; then $SUDO service postgresql stop >/dev/null 2>&1 || true; fi
fi
# promtool (from Debian's prometheus package) checks and unit-tests config/prometheus/ in the test suite.
if ! command -v promtool >/dev/null; then
    echo "bootstrap: installing prometheus (for promtool)"
    apt_install prometheus
    # The package starts a Prometheus server of its own; the project only needs promtool, so stop it.
    $SUDO service prometheus stop >/dev/null 2>&1 || true
    if command -v systemctl >/dev/null; then $SUDO systemctl disable prometheus >/dev/null 2>&1 || true; fi
fi
# The TLS tests make throwaway certificates with the openssl command.
if ! command -v openssl >/dev/null; then
    echo "bootstrap: installing openssl"
    apt_install openssl
fi
# systemd-analyze (Debian's systemd package) verifies systemd/parafort-proxy.service in the test suite; it
# works offline, without systemd running as PID 1.
if ! command -v systemd-analyze >/dev/null; then
    echo "bootstrap: installing systemd (for systemd-analyze)"
    apt_install systemd
fi
# Extra Debian packages named on the command line; `bench` stands for what `make bench` compares against:
# PgBouncer and Pgpool-II.
wanted=()
for arg in "$@"; do
    case "$arg" in
        bench) wanted+=(pgbouncer pgpool2) ;;
        *) wanted+=("$arg") ;;
    esac
done
extra=()
for pkg in ${wanted[@]+"${wanted[@]}"}; do
    dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || extra+=("$pkg")
done
if [ ${#extra[@]} -gt 0 ]; then
    echo "bootstrap: installing ${extra[*]}"
    apt_install "${extra[@]}"
    # The packages start daemons of their own (PgBouncer on 6432, Pgpool-II on 5432-ish ports): the
    # benchmark runs private instances on ephemeral ports, so stop and disable the packaged services.
    for svc in pgbouncer pgpool2; do
        case " ${extra[*]} " in *" $svc "*) ;; *) continue ;; esac
        $SUDO service "$svc" stop >/dev/null 2>&1 || true
        if command -v systemctl >/dev/null; then $SUDO systemctl disable "$svc" >/dev/null 2>&1 || true; fi
    done
fi

PYTHON="${PYTHON:-python3}"
# The fast path's scanners (proxy/protocol/scan.pyx) are compiled by pip: a C compiler and Python's headers.
if ! command -v cc >/dev/null; then
    echo "bootstrap: installing gcc (to compile proxy/protocol/scan.pyx)"
    apt_install gcc libc6-dev
fi
if ! "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    echo "bootstrap: installing python3-dev (Python.h, to compile proxy/protocol/scan.pyx)"
    apt_install python3-dev
fi
stamp=".venv/.installed"
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
    || [ setup.py -nt "$stamp" ] || [ proxy/protocol/scan.pyx -nt "$stamp" ] \
    || ! compgen -G "proxy/protocol/scan*.so" >/dev/null; then
    echo "bootstrap: creating .venv and installing parafort-proxy[test]"
    if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        apt_install python3-venv
        "$PYTHON" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
