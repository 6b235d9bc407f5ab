#!/usr/bin/env bash
# Shared by scripts/dev and scripts/test: install what is missing and start local services.
# Idempotent and quiet when everything is already there. Run as root (or with sudo).
# `scripts/setup.sh --runtime` (scripts/dev) installs what the service needs to run;
# `scripts/setup.sh --tests` (scripts/test, the default) also the test and lint tools (the `dev`
# extra), sshd for the SFTP tests and Chromium, which renders the API docs offline in a test.
set -euo pipefail
RUNTIME_ONLY=""
case "${1:-}" in
    --runtime) RUNTIME_ONLY=1 ;;
    --tests | "") ;;
    *) echo "usage: scripts/setup.sh [--runtime | --tests]" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

apt_updated=""
apt_install() {
    [ -n "$apt_updated" ] || { $SUDO apt-get update -q >/dev/null; apt_updated=1; }
    $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# --- Debian packages -----------------------------------------------------------------------
scripts/install-virt-deps.sh
want=()
[ -n "$RUNTIME_ONLY" ] || [ -x /usr/sbin/sshd ] || want+=(openssh-server)  # SFTP tests: sshd
command -v python3.11 >/dev/null || want+=(python3.11 python3.11-venv python3.11-dev)
command -v pg_isready >/dev/null || want+=(postgresql postgresql-client)
command -v redis-server >/dev/null || want+=(redis-server)
command -v jq >/dev/null || want+=(jq)                   # the README's walkthrough reads JSON
command -v curl >/dev/null || want+=(curl)
[ -n "$RUNTIME_ONLY" ] || command -v chromium >/dev/null || want+=(chromium)  # the docs test
if [ ${#want[@]} -gt 0 ]; then log "installing ${want[*]}"; apt_install "${want[@]}"; fi

# --- PostgreSQL and Redis (start them only when not answering) -------------------------------
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    log "starting PostgreSQL"
    cluster=$(ls /etc/postgresql | sort -V | tail -1)
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
    for _ in $(seq 50); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
    pg_isready -h 127.0.0.1 -p 5432 -q || { echo "PostgreSQL did not start" >&2; exit 1; }
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting Redis"
    $SUDO mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ibp.log
    for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# --- Python environment (versions pinned by constraints.txt; re-run when either file changes) -
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3.11 -m venv .venv
fi
# A dev install holds the runtime one: a runtime setup is content with either stamp.
stamp=".venv/.ibp-installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -n "$RUNTIME_ONLY" ]; then kind=runtime spec=. ; else kind=dev spec='.[dev]'; fi
if [ ! -f "$stamp-dev" ] && [ ! -f "$stamp-$kind" ]; then
    log "installing Python dependencies ($kind)"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -c constraints.txt -e "$spec"
    rm -f .venv/.ibp-installed-*
    touch "$stamp-$kind"
fi

# --- libvirt + QEMU (the backup engine and its tests drive real VMs) -------------------------
scripts/start-libvirtd.sh >/dev/null
