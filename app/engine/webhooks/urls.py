"""Where webhooks may go: http(s) URLs whose host resolves to public addresses only, unless
IBP_WEBHOOKS_ALLOW_PRIVATE lets the service reach loopback and private networks.

Checked when an endpoint is registered or changed, and again before every attempt: a name may
resolve elsewhere by then. The attempt then connects to the very address checked (`Target`),
so the name cannot change between the check and the connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SCHEMES = {"http": 80, "https": 443}
RESOLVE_TIMEOUT_S = 5.0


class UrlRefused(ValueError):
    """The URL is not one webhooks may be sent to; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses to connect to, in the resolver's order."""

    url: SplitResult
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


def parse(url: str) -> tuple[SplitResult, str, int]:
    """The URL, its host and its port, if its form is acceptable."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"not a valid URL ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise UrlRefused("must be an http:// or https:// URL")
    if not parts.hostname:
        raise UrlRefused("must name a host")
    if parts.fragment:
        raise UrlRefused("must not have a fragment (#...)")
    return parts, parts.hostname, port or SCHEMES[parts.scheme]


def refusal(address: IPAddress) -> str | None:
    """Why webhooks may not go to this address (loopback, private...), or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, matches in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if matches:
            return kind
    if not address.is_global:
        return "non-public"
    return None


async def resolve(url: str, allow_private: bool) -> Target:
    """The URL checked, with the addresses of its host.

    Every address the name resolves to must be allowed: a name that points both outside and
    inside is refused as a whole."""
    parts, host, port = parse(url)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        addresses = await _lookup(host, port)
    if not allow_private:
        for address in addresses:
            if (kind := refusal(address)) is not None:
                raise UrlRefused(
                    f"{host} resolves to a {kind} address ({address}); webhooks go to public "
                    "addresses only unless the administrator sets IBP_WEBHOOKS_ALLOW_PRIVATE"
                )
    return Target(parts, host, port, tuple(addresses))


def pinned(target: Target, address: IPAddress) -> tuple[str, dict[str, Any]]:
    """The URL with its host replaced by a checked address, and for https the name to ask
    the server's certificate for (SNI and verification), so the connection goes where the
    check allowed even if the name resolves elsewhere a moment later."""
    host = f"[{address}]" if address.version == 6 else str(address)
    userinfo, at, _ = target.url.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{host}:{target.port}"
    url = target.url._replace(netloc=netloc, fragment="").geturl()
    extensions: dict[str, Any] = {}
    if target.url.scheme == "https":
        extensions["sni_hostname"] = target.host
    return url, extensions


async def _lookup(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        raise UrlRefused(f"{host} cannot be resolved ({exc})") from None
    found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not found:
        raise UrlRefused(f"{host} cannot be resolved")
    return list(dict.fromkeys(found))
