#!/usr/bin/env bash
# Install QEMU + libvirt (daemon, QEMU driver, clients, headers for libvirt-python) when missing.
# NEVER libvirt-daemon-system: it pulls systemd (replaces init), iptables and a network.
set -euo pipefail

# nbdkit and qemu-nbd (in qemu-utils): NBD servers the NBD client's tests run against.
PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
          libvirt-dev pkg-config nbdkit)
COMMANDS=(qemu-system-x86_64 qemu-img qemu-io qemu-nbd libvirtd virtlogd virsh pkg-config nbdkit)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$pkg")
done
for cmd in "${COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null || missing+=("command:$cmd")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-virt-deps: all present"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-virt-deps: missing ${missing[*]}; installing"
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${PACKAGES[@]}"
