#!/usr/bin/env bash
# Install QEMU + libvirt (daemon, QEMU driver, clients, headers for libvirt-python) when missing.
# NEVER libvirt-daemon-system: it pulls systemd (replaces init), iptables and a network.
set -euo pipefail

PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
          libvirt-dev pkg-config)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$pkg")
    fi
done
for cmd in qemu-system-x86_64 qemu-img libvirtd virtlogd virsh; do
    command -v "$cmd" >/dev/null || { [ ${#missing[@]} -gt 0 ] || missing+=(qemu-system-x86); }
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-virt-deps: all present"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-virt-deps: installing ${PACKAGES[*]} (missing: ${missing[*]})"
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${PACKAGES[@]}"
