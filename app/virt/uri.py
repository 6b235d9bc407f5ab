"""Which libvirt URIs a hypervisor may have: the few forms an operator needs, nothing that makes
libvirt run a program or read a file of the writer's choosing.

libvirt does what a URI says, on the host that opens it, as that process: the hypervisor's
worker, usually root. `qemu+ext:///system?command=/bin/sh` runs that command; the ssh
transport's `command=`, `netcat=` and `socket=` choose what runs on either end, `keyfile=`
which private key is read; `qemu:///embed?root=...` starts a QEMU driver inside the worker.
The URI is written by an API admin, so it is checked when written (the hypervisor schemas) and
again before every connection (`connect` in app/virt/_conn.py), for rows written before this
check existed.

Allowed, and nothing else:
- `qemu:///system` (the default) and `qemu:///session`: the local daemon over its UNIX socket,
  which is where a hypervisor's worker runs (on the hypervisor itself);
- `qemu+ssh://[user@]host[:port]/system` and `qemu+tls://host[:port]/system` (or `/session`)
  for a worker that reaches its hypervisor over the network. The key, the known hosts and the
  certificates are the worker host's defaults (`~/.ssh`, `/etc/pki`), set up by whoever runs
  the worker, not chosen through the API.

Parameters (`?name=value`, each with a fixed set of values, so none names a file or a program):
- `no_tty` (ssh): ssh never prompts on a terminal. A worker has none; a prompt would hang it.
- `mode` (local, ssh): which daemon's socket, `auto`, `legacy` (libvirtd) or `direct`
  (virtqemud). A choice between sockets libvirt itself knows, no path.

Refused on purpose: `command`, `netcat`, `socket`, `keyfile`, `pkipath`, `known_hosts`
(programs and files), `no_verify` and `known_hosts_verify` (they turn off the check that the
worker talks to the real hypervisor), `sshauth`, `tls_priority`, `proxy`, `name` (not needed by
the transports allowed) and the transports `ext`, `tcp` (unencrypted, usually unauthenticated),
`unix` with a socket, `libssh`, `libssh2` and every other driver (`test:///path` reads a file).
Percent escapes and `;` are refused too: libvirt decodes and splits on them, so `comm%61nd` and
`no_tty=1;command=...` cannot slip past this parser as something else.
"""

from __future__ import annotations

import re

LOCAL = "qemu"
SSH = "qemu+ssh"
TLS = "qemu+tls"
PATHS = ("/system", "/session")

#: parameter -> (the schemes it is allowed with, its allowed values)
PARAMETERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "no_tty": (frozenset({SSH}), frozenset({"0", "1"})),
    "mode": (frozenset({LOCAL, SSH}), frozenset({"auto", "legacy", "direct"})),
}

# Anything but these: a space, a control character, a percent escape, `;`, a fragment...
_FORBIDDEN = re.compile(r"[^A-Za-z0-9._~:/?&=@+\[\]-]")
# A host name or an IPv4 address; never starting with "-", which ssh would read as an option.
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\]")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}")
_PORT = re.compile(r"[0-9]{1,5}")


class UriRefused(ValueError):
    """The URI is not one a hypervisor may have; the message names the part refused."""


def check_libvirt_uri(uri: str) -> str:
    """Return `uri` if it is one of the allowed forms; UriRefused naming the part otherwise."""
    forbidden = _FORBIDDEN.search(uri)
    if forbidden is not None:
        raise UriRefused(f"the character {forbidden.group()!r} is not allowed in a libvirt URI")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise UriRefused("must look like qemu:///system, qemu+ssh://host/system or qemu+tls://...")
    if scheme not in (LOCAL, SSH, TLS):
        raise UriRefused(
            f"the driver and transport '{scheme}' are not allowed (use {LOCAL}, {SSH} or {TLS})"
        )
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    _check_netloc(scheme, netloc)
    if slash + path not in PATHS:
        raise UriRefused(f"the path '{slash + path}' is not allowed (use /system or /session)")
    _check_parameters(scheme, query)
    return uri


def _check_netloc(scheme: str, netloc: str) -> None:
    if scheme == LOCAL:
        if netloc:
            raise UriRefused(f"a host needs a transport: {SSH}://{netloc}/... or {TLS}://...")
        return
    user, at, hostport = netloc.rpartition("@")
    if at and scheme != SSH:
        raise UriRefused(f"a user name ('{user}') is only used by {SSH}")
    if at and _USER.fullmatch(user) is None:
        raise UriRefused(f"the user name '{user}' is not allowed")
    host, port = hostport, ""
    if ":" in hostport and not hostport.endswith("]"):
        host, _, port = hostport.rpartition(":")
    if not host:
        raise UriRefused(f"{scheme} needs a host")
    if _HOST.fullmatch(host) is None:
        raise UriRefused(f"the host '{host}' is not allowed")
    if port and (_PORT.fullmatch(port) is None or not 1 <= int(port) <= 65535):
        raise UriRefused(f"the port '{port}' is not allowed")


def _check_parameters(scheme: str, query: str) -> None:
    seen: set[str] = set()
    for pair in query.split("&") if query else ():
        name, eq, value = pair.partition("=")
        if name not in PARAMETERS:
            allowed = ", ".join(sorted(PARAMETERS))
            raise UriRefused(f"the parameter '{name}' is not allowed (only {allowed})")
        schemes, values = PARAMETERS[name]
        if scheme not in schemes:
            raise UriRefused(f"the parameter '{name}' is not allowed with {scheme}")
        if not eq or value not in values:
            choices = ", ".join(sorted(values))
            raise UriRefused(f"the parameter '{name}' must be one of {choices}, not '{value}'")
        if name in seen:
            raise UriRefused(f"the parameter '{name}' is given twice")
        seen.add(name)
