#!/usr/bin/env bash
# Start virtlogd + libvirtd (QEMU driver, qemu:///system) without systemd, as root.
# Idempotent: does nothing when `virsh -c qemu:///system version` already answers.
# See /work/shared/notes/libvirt-in-ci.md for why each step is here.
set -euo pipefail

URI="qemu:///system"
TIMEOUT="${LIBVIRTD_START_TIMEOUT:-60}"

die() { echo "start-libvirtd: $*" >&2; exit 1; }

answers() { virsh -c "$URI" version >/dev/null 2>&1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v libvirtd >/dev/null || die "libvirtd not installed (run scripts/install-virt-deps.sh)"
command -v virtlogd >/dev/null || die "virtlogd not installed (run scripts/install-virt-deps.sh)"
command -v virsh >/dev/null || die "virsh not installed (run scripts/install-virt-deps.sh)"

if answers; then
    echo "start-libvirtd: libvirtd already answers on $URI"
    exit 0
fi

# docs/libvirt.md, pitfall 1: the QEMU driver refuses to load without this account.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

# docs/libvirt.md, pitfall 2: both daemons exit 1 without /var/log/libvirt.
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/images /var/cache/libvirt/qemu /run/libvirt /etc/libvirt

# docs/libvirt.md, pitfall 3: namespaces = [ ] in containers. Root, no cgroups, no security driver.
want_conf='user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]'
if [ ! -f /etc/libvirt/qemu.conf ] || [ "$(cat /etc/libvirt/qemu.conf)" != "$want_conf" ]; then
    printf '%s\n' "$want_conf" > /etc/libvirt/qemu.conf
fi

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! pid_alive /run/virtlogd.pid; then
    rm -f /run/virtlogd.pid
    virtlogd -d --pid-file /run/virtlogd.pid || die "virtlogd failed to start"
fi

if ! pid_alive /run/libvirtd.pid; then
    rm -f /run/libvirtd.pid
    libvirtd -d --pid-file /run/libvirtd.pid || die "libvirtd failed to start"
fi

# `libvirtd -d` exiting 0 does not mean it is ready (first start probes QEMU, ~8 s).
deadline=$(( $(date +%s) + TIMEOUT ))
until answers; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "start-libvirtd: libvirtd did not answer on $URI within ${TIMEOUT}s" >&2
        virsh -c "$URI" version >&2 || true
        if ! pid_alive /run/libvirtd.pid; then
            echo "start-libvirtd: libvirtd process is not running" >&2
        fi
        exit 1
    fi
    if ! pid_alive /run/libvirtd.pid; then
        die "libvirtd exited during startup (see /var/log/libvirt, try: libvirtd -v)"
    fi
    sleep 0.1
done
echo "start-libvirtd: libvirtd ready on $URI"
