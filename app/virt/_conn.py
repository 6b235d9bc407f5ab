"""libvirt connections: one per call, errors silenced on stderr, translated.

(docs/libvirt.md, pitfall 10: libvirt-python prints every error unless a handler is set.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import libvirt

from app.virt.errors import DomainNotFound, VirtError
from app.virt.uri import UriRefused, check_libvirt_uri

# libvirt-python has no type stubs; these aliases document what a value is.
Connection = Any  # libvirt.virConnect
Domain = Any  # libvirt.virDomain

_handler_lock = threading.Lock()
_handler_registered = False


def _quiet_error_handler(_ctx: object, _err: object) -> None:
    """Swallow libvirt's default print-to-stderr; errors still raise libvirtError."""


def register_error_handler() -> None:
    """Install the quiet libvirt error handler once per process (idempotent, thread-safe)."""
    global _handler_registered
    with _handler_lock:
        if not _handler_registered:
            libvirt.registerErrorHandler(_quiet_error_handler, None)
            _handler_registered = True


def error_code(exc: BaseException) -> int | None:
    """The libvirt error code of a ``libvirtError`` (None for anything else)."""
    if isinstance(exc, libvirt.libvirtError):
        code = exc.get_error_code()
        return int(code) if code is not None else None
    return None


def error_text(exc: BaseException) -> str:
    """The libvirt message without the Python wrapper noise."""
    if isinstance(exc, libvirt.libvirtError):
        msg = exc.get_error_message()
        if msg:
            return str(msg)
    return str(exc)


@contextmanager
def connect(uri: str) -> Iterator[Connection]:
    """Open a read-write connection to ``uri`` for the duration of the block.

    The URI is checked first (app/virt/uri.py): a hypervisor row written before the API checked
    URIs may still hold one that makes libvirt run a program here.
    """
    try:
        check_libvirt_uri(uri)
    except UriRefused as exc:
        raise VirtError(
            f"Refusing to connect to the hypervisor at {uri!r}: {exc}; "
            "correct the hypervisor's libvirt_uri"
        ) from exc
    register_error_handler()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise VirtError(f"Cannot connect to the hypervisor at {uri}: {error_text(exc)}") from exc
    if conn is None:  # pragma: no cover - old bindings returned None
        raise VirtError(f"Cannot connect to the hypervisor at {uri}")
    try:
        yield conn
    finally:
        with suppress(libvirt.libvirtError):
            conn.close()


def lookup(conn: Connection, domain: str) -> Domain:
    """Find a domain by name (or UUID string); DomainNotFound when it does not exist."""
    try:
        return conn.lookupByName(domain)
    except libvirt.libvirtError as exc:
        if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
            raise VirtError(f"Cannot look up instance {domain}: {error_text(exc)}") from exc
    try:
        return conn.lookupByUUIDString(domain)
    except libvirt.libvirtError:
        pass
    raise DomainNotFound(f"Instance {domain} does not exist on the hypervisor")


@contextmanager
def open_domain(uri: str, domain: str) -> Iterator[Domain]:
    """Connect and look the domain up; the connection closes when the block ends."""
    with connect(uri) as conn:
        yield lookup(conn, domain)
