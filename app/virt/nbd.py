"""A small asyncio NBD client for reading libvirt pull-mode backup exports.

It speaks the parts of the NBD protocol (https://github.com/NetworkBlockDevice/nbd,
doc/proto.md) that reading a disk needs, and nothing more:

* the fixed newstyle handshake with ``NBD_OPT_STRUCTURED_REPLY``,
  ``NBD_OPT_SET_META_CONTEXT`` (``base:allocation``, ``qemu:dirty-bitmap:NAME``, ...) and
  ``NBD_OPT_GO``;
* ``NBD_CMD_READ`` with several requests in flight on one connection; one reader task
  dispatches the replies by cookie. Structured replies (data, hole and error chunks) and
  simple replies are both understood;
* ``NBD_CMD_BLOCK_STATUS``, repeated until every negotiated context covers the asked range;
* ``NBD_CMD_DISC`` on close.

It does not implement: writes, flush, trim or any other command that changes the export;
TLS (``NBD_OPT_STARTTLS``); the oldstyle handshake and the ``NBD_OPT_EXPORT_NAME`` fallback
(QEMU and nbdkit both answer ``NBD_OPT_GO``); extended headers (64-bit lengths);
``NBD_OPT_LIST`` / ``NBD_OPT_INFO``; block size constraints (it does not ask for them, so
servers accept any alignment). There are no timeouts here: wrap calls in
``asyncio.wait_for`` where a hung server matters.

Everything runs on the event loop (non-blocking socket, ``loop.sock_recv_into``); a read's
payload is received straight into a reused buffer, then copied once into the bytes returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from app.virt.errors import VirtError

__all__ = [
    "MAX_READ",
    "STATE_DIRTY",
    "STATE_HOLE",
    "STATE_ZERO",
    "Extent",
    "NbdClient",
    "NbdDisconnected",
    "NbdError",
]


class NbdError(VirtError):
    """The server refused, failed or went away. Message for an operator; says what failed."""


class NbdDisconnected(NbdError):
    """The connection closed or broke (server killed, socket gone)."""


STATE_HOLE = 1  # base:allocation
STATE_ZERO = 2  # base:allocation
STATE_DIRTY = 1  # qemu:dirty-bitmap:*
MAX_READ = 32 * 1024 * 1024
# One block-status request asks about at most this much (QEMU caps lower anyway).
BLOCK_STATUS_MAX = 1024 * 1024 * 1024


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    flags: int


# --- protocol constants (doc/proto.md) ---------------------------------------------------

_NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", also the option request magic
_OLDSTYLE_MAGIC = 0x00420281861253
_OPT_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_STRUCTURED_REPLY_MAGIC = 0x668E33EF

_FLAG_FIXED_NEWSTYLE = 1 << 0
_FLAG_NO_ZEROES = 1 << 1

_OPT_ABORT = 2
_OPT_GO = 7
_OPT_STRUCTURED_REPLY = 8
_OPT_SET_META_CONTEXT = 10
_OPT_NAMES = {
    _OPT_ABORT: "NBD_OPT_ABORT",
    _OPT_GO: "NBD_OPT_GO",
    _OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    _OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

_REP_ACK = 1
_REP_INFO = 3
_REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
_REP_ERR_NAMES = {
    _REP_ERR | 1: "NBD_REP_ERR_UNSUP",
    _REP_ERR | 2: "NBD_REP_ERR_POLICY",
    _REP_ERR | 3: "NBD_REP_ERR_INVALID",
    _REP_ERR | 4: "NBD_REP_ERR_PLATFORM",
    _REP_ERR | 5: "NBD_REP_ERR_TLS_REQD",
    _REP_ERR | 6: "NBD_REP_ERR_UNKNOWN",
    _REP_ERR | 7: "NBD_REP_ERR_SHUTDOWN",
    _REP_ERR | 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    _REP_ERR | 9: "NBD_REP_ERR_TOO_BIG",
}
_REP_ERR_UNSUP = _REP_ERR | 1
_REP_ERR_TLS_REQD = _REP_ERR | 5
_REP_ERR_UNKNOWN = _REP_ERR | 6

_INFO_EXPORT = 0

_CMD_READ = 0
_CMD_DISC = 2
_CMD_BLOCK_STATUS = 7

_REPLY_FLAG_DONE = 1 << 0
_REPLY_TYPE_NONE = 0
_REPLY_TYPE_OFFSET_DATA = 1
_REPLY_TYPE_OFFSET_HOLE = 2
_REPLY_TYPE_BLOCK_STATUS = 5
_REPLY_TYPE_ERROR_BIT = 1 << 15
_REPLY_TYPE_ERROR_OFFSET = _REPLY_TYPE_ERROR_BIT | 2

# NBD error values are protocol constants (they happen to match Linux errno numbers).
_ERRNO = {
    1: ("EPERM", "operation not permitted"),
    5: ("EIO", "input/output error"),
    12: ("ENOMEM", "out of memory"),
    22: ("EINVAL", "invalid argument"),
    28: ("ENOSPC", "no space left"),
    75: ("EOVERFLOW", "value too large"),
    95: ("ENOTSUP", "operation not supported"),
    108: ("ESHUTDOWN", "server is shutting down"),
}

_OPT_HEADER = struct.Struct(">QII")  # magic, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REST = struct.Struct(">IQ")  # error, cookie (after the magic)
_STRUCTURED_REST = struct.Struct(">HHQI")  # flags, type, cookie, length (after the magic)

# Sanity limits on what the server may make us allocate.
_MAX_OPTION_REPLY = 16 * 1024 * 1024
_MAX_STATUS_CHUNK = 64 * 1024 * 1024
_RECV_BUFFER = 256 * 1024
_SPARE_BUFFERS = 8


def _errno_text(value: int) -> str:
    name, text = _ERRNO.get(value, (f"error {value}", "unknown error"))
    return f"{name} ({text})"


class _Closed(Exception):
    """The socket reached end of file."""


class _ProtocolError(Exception):
    """The server sent something this client cannot make sense of."""


class _SocketReader:
    """Buffered reads from a non-blocking socket.

    Small reads (headers) are served from an internal buffer; the rest of a large payload is
    received straight into the caller's buffer, without extra copies.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    async def _recv(self, target: memoryview) -> int:
        got = await self._loop.sock_recv_into(self._sock, target)
        if got == 0:
            raise _Closed
        return got

    async def read_into(self, target: memoryview) -> None:
        """Fill target entirely."""
        need = len(target)
        pos = min(self._end - self._start, need)
        if pos:
            target[:pos] = self._view[self._start : self._start + pos]
            self._start += pos
        while pos < need:
            if need - pos >= _RECV_BUFFER // 2:
                pos += await self._recv(target[pos:])
            else:
                got = await self._recv(self._view)
                take = min(got, need - pos)
                target[pos : pos + take] = self._view[:take]
                pos += take
                self._start, self._end = take, got

    async def read(self, n: int) -> bytearray:
        data = bytearray(n)
        if n:
            await self.read_into(memoryview(data))
        return data

    async def skip(self, n: int) -> None:
        while n > 0:
            chunk = min(n, _RECV_BUFFER)
            await self.read(chunk)
            n -= chunk


@dataclass(eq=False)
class _Request:
    """One command in flight, completed by the reader task."""

    kind: str  # "read" or "block-status request", for messages
    offset: int
    length: int
    future: asyncio.Future[None]
    buffer: memoryview | None = None  # reads: where the data goes (length bytes)
    received: int = 0  # reads: bytes covered by data and hole chunks
    statuses: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    error: NbdError | None = None  # the first error chunk; raised once the reply is done

    def describe(self) -> str:
        return f"a {self.kind} at offset {self.offset} (length {self.length})"


class NbdClient:
    """One NBD connection to one export. Create with ``await NbdClient.connect(...)``.

    ``size`` is the export size in bytes, ``contexts`` the meta contexts the server agreed
    to (in the order asked). ``block_status_requests`` counts the NBD_CMD_BLOCK_STATUS
    requests sent (servers often answer only part of a range per request).
    """

    size: int
    contexts: tuple[str, ...]

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        reader: _SocketReader,
        where: str,
        export: str,
        size: int,
        transmission_flags: int,
        contexts: dict[str, int],
        structured: bool,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._reader = reader
        self._where = where
        self.export = export
        self.size = size
        self.transmission_flags = transmission_flags
        self.contexts = tuple(contexts)
        self._context_ids = contexts
        self._context_names = {cid: name for name, cid in contexts.items()}
        self._structured = structured
        self._pending: dict[int, _Request] = {}
        self._next_cookie = 1
        self._write_lock = asyncio.Lock()
        self._broken: str | None = None  # why the connection is unusable
        self._closing = False
        self.block_status_requests = 0
        self._spare: list[memoryview] = []  # read buffers to reuse
        self._reader_task = loop.create_task(self._read_replies())

    # --- handshake ---------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, address: str | tuple[str, int], export: str, contexts: Sequence[str] = ()
    ) -> NbdClient:
        """Connect to ``address`` (a unix socket path, or (host, port)) and open ``export``.

        Fixed newstyle handshake, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT for
        ``contexts``, NBD_OPT_GO. A context the server does not offer -> NbdError naming it.
        """
        loop = asyncio.get_running_loop()
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        sock = await _open_socket(loop, address, where)
        try:
            return await _Handshake(loop, sock, where, export).run(list(contexts))
        except BaseException:
            sock.close()
            raise

    # --- commands ----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes (at most MAX_READ) at ``offset``. Safe to call concurrently."""
        if length > MAX_READ:
            raise NbdError(f"cannot read {length} bytes at once (at most {MAX_READ})")
        self._check_range("read", offset, length)
        if length == 0:
            return b""
        # Received into a reused buffer, then copied once: cheaper than filling fresh memory
        # (page faults) for every read.
        buffer = self._take_buffer(length)
        await self._submit(_CMD_READ, "read", offset, length, buffer[:length])
        data = bytes(buffer[:length])
        if len(self._spare) < _SPARE_BUFFERS:
            self._spare.append(buffer)
        return data

    def _take_buffer(self, length: int) -> memoryview:
        for i, buffer in enumerate(self._spare):
            if len(buffer) >= length:
                return self._spare.pop(i)
        return memoryview(bytearray(length))

    async def block_status(
        self, offset: int = 0, length: int | None = None
    ) -> dict[str, list[Extent]]:
        """Extents of every negotiated context over [offset, offset+length).

        ``length`` defaults to the rest of the export. Asks again from the smallest end
        reached until every context covers the whole range; extents are clipped to the range
        and adjacent extents with equal flags merged.
        """
        if length is None:
            length = self.size - offset
        self._check_range("get the block status of", offset, length)
        if not self.contexts:
            raise NbdError("block status needs a meta context; none was negotiated")
        end = offset + length
        result: dict[str, list[Extent]] = {name: [] for name in self.contexts}
        reached = dict.fromkeys(self.contexts, offset)
        pos = offset
        while pos < end:
            ask = min(end - pos, BLOCK_STATUS_MAX)
            self.block_status_requests += 1
            request = await self._submit(_CMD_BLOCK_STATUS, "block-status request", pos, ask)
            for cid, name in self._context_names.items():
                descriptors = request.statuses.get(cid)
                if not descriptors:
                    raise NbdError(
                        f"the NBD server at {self._where} sent no {name} extents for "
                        f"{request.describe()}"
                    )
                cursor = pos
                for ext_length, flags in descriptors:
                    start, stop = max(cursor, reached[name]), min(cursor + ext_length, end)
                    if stop > start:
                        _append(result[name], start, stop - start, flags)
                    cursor += ext_length
                    if cursor >= end:
                        break
                reached[name] = max(reached[name], min(cursor, end))
            pos = min(reached.values())
        return result

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdError(
                f"cannot {what} {length} bytes at offset {offset}: the export "
                f"{self.export!r} at {self._where} has {self.size} bytes"
            )

    async def _submit(
        self, command: int, kind: str, offset: int, length: int, buffer: memoryview | None = None
    ) -> _Request:
        if self._broken is not None:
            raise NbdDisconnected(self._broken)
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < 2**64 - 1 else 1
        request = _Request(kind, offset, length, self._loop.create_future(), buffer)
        self._pending[cookie] = request
        header = _REQUEST.pack(_REQUEST_MAGIC, 0, command, cookie, offset, length)
        # The send runs in its own task, so a cancelled caller never leaves half a request
        # on the wire; the reply is then read and dropped.
        await asyncio.shield(self._loop.create_task(self._send(header, request)))
        await request.future
        return request

    async def _send(self, data: bytes, request: _Request | None) -> None:
        async with self._write_lock:
            if self._broken is not None:
                self._fail_request(request, NbdDisconnected(self._broken))
                return
            try:
                await self._loop.sock_sendall(self._sock, data)
            except OSError as exc:
                what = request.describe() if request is not None else "a request"
                self._break(
                    f"the connection to the NBD server at {self._where} broke ({exc}) "
                    f"while sending {what}"
                )

    def _fail_request(self, request: _Request | None, exc: NbdError) -> None:
        if request is not None and not request.future.done():
            request.future.set_exception(exc)

    # --- replies -----------------------------------------------------------------------

    async def _read_replies(self) -> None:
        reader = self._reader
        current: _Request | None = None
        try:
            while True:
                current = None
                (magic,) = struct.unpack(">I", await reader.read(4))
                if magic == _SIMPLE_REPLY_MAGIC:
                    error, cookie = _SIMPLE_REST.unpack(await reader.read(_SIMPLE_REST.size))
                    current = self._request(cookie)
                    del self._pending[cookie]
                    if error:
                        self._complete(current, self._server_error(current, error, ""))
                        continue
                    if current.buffer is not None:
                        await reader.read_into(current.buffer)
                        current.received = current.length
                    elif current.kind != "read":
                        raise _ProtocolError(f"a simple reply without error to {current.kind}")
                    self._complete(current, None)
                elif magic == _STRUCTURED_REPLY_MAGIC:
                    header = await reader.read(_STRUCTURED_REST.size)
                    flags, kind, cookie, length = _STRUCTURED_REST.unpack(header)
                    current = self._request(cookie)
                    await self._chunk(current, kind, length)
                    if flags & _REPLY_FLAG_DONE:
                        del self._pending[cookie]
                        if current.error is None and current.received != (
                            current.length if current.buffer is not None else 0
                        ):
                            raise _ProtocolError(
                                f"the reply covered {current.received} of {current.length} bytes"
                            )
                        self._complete(current, current.error)
                else:
                    raise _ProtocolError(f"bad reply magic 0x{magic:08x}")
        except _Closed:
            if self._closing and not self._pending:
                self._break(f"the connection to the NBD server at {self._where} is closed")
            else:
                self._break(
                    f"the NBD server at {self._where} closed the connection",
                    during=current,
                )
        except OSError as exc:
            self._break(
                f"the connection to the NBD server at {self._where} broke ({exc})",
                during=current,
            )
        except _ProtocolError as exc:
            self._break(
                f"the NBD server at {self._where} sent an invalid reply ({exc}); "
                "the connection was closed",
                during=current,
                cls=NbdError,
            )
        except asyncio.CancelledError:
            self._break(f"the connection to the NBD server at {self._where} was closed")
            raise
        except Exception as exc:  # a bug here must not leave callers waiting forever
            self._break(
                f"the NBD client failed reading from {self._where} ({exc!r})",
                during=current,
                cls=NbdError,
            )
            raise

    def _request(self, cookie: int) -> _Request:
        request = self._pending.get(cookie)
        if request is None:
            raise _ProtocolError(f"a reply to unknown cookie {cookie}")
        return request

    async def _chunk(self, request: _Request, kind: int, length: int) -> None:
        reader = self._reader
        if kind == _REPLY_TYPE_OFFSET_DATA:
            if length < 9 or request.buffer is None:
                raise _ProtocolError(f"a data chunk of {length} bytes to {request.kind}")
            (offset,) = struct.unpack(">Q", await reader.read(8))
            start = self._chunk_start(request, offset, length - 8)
            await reader.read_into(request.buffer[start : start + length - 8])
            request.received += length - 8
        elif kind == _REPLY_TYPE_OFFSET_HOLE:
            if length != 12 or request.buffer is None:
                raise _ProtocolError(f"a hole chunk of {length} bytes to {request.kind}")
            offset, hole = struct.unpack(">QI", await reader.read(12))
            start = self._chunk_start(request, offset, hole)
            request.buffer[start : start + hole] = bytes(hole)
            request.received += hole
        elif kind == _REPLY_TYPE_BLOCK_STATUS:
            if length < 12 or length % 8 != 4 or length > _MAX_STATUS_CHUNK:
                raise _ProtocolError(f"a block status chunk of {length} bytes")
            payload = await reader.read(length)
            (cid,) = struct.unpack_from(">I", payload)
            if cid not in self._context_names or cid in request.statuses:
                raise _ProtocolError(f"an unexpected block status chunk for context id {cid}")
            pairs = struct.unpack_from(f">{(length - 4) // 4}I", payload, 4)
            descriptors = list(zip(pairs[::2], pairs[1::2], strict=True))
            if any(ext_length == 0 for ext_length, _ in descriptors):
                raise _ProtocolError("a block status extent of length 0")
            request.statuses[cid] = descriptors
        elif kind & _REPLY_TYPE_ERROR_BIT:
            if length < 6:
                raise _ProtocolError(f"an error chunk of {length} bytes")
            payload = await reader.read(length)
            error, message_length = struct.unpack_from(">IH", payload)
            if 6 + message_length > length:
                raise _ProtocolError("an error chunk whose message overflows it")
            message = payload[6 : 6 + message_length].decode("utf-8", "replace")
            if kind == _REPLY_TYPE_ERROR_OFFSET and length >= 6 + message_length + 8:
                (offset,) = struct.unpack_from(">Q", payload, 6 + message_length)
                message = f"at offset {offset}: {message}" if message else f"at offset {offset}"
            if request.error is None:
                request.error = self._server_error(request, error, message)
        elif kind == _REPLY_TYPE_NONE:
            if length:
                raise _ProtocolError(f"a NONE chunk of {length} bytes")
        else:
            raise _ProtocolError(f"unknown chunk type {kind}")

    def _chunk_start(self, request: _Request, offset: int, length: int) -> int:
        start = offset - request.offset
        if start < 0 or start + length > request.length:
            raise _ProtocolError(
                f"a chunk at offset {offset} (length {length}) outside {request.describe()}"
            )
        return start

    def _server_error(self, request: _Request, error: int, message: str) -> NbdError:
        text = f"the NBD server at {self._where} failed {request.describe()}: "
        text += _errno_text(error)
        return NbdError(f"{text}: {message}" if message else text)

    def _complete(self, request: _Request, error: NbdError | None) -> None:
        if request.future.done():  # the caller was cancelled
            return
        if error is None:
            request.future.set_result(None)
        else:
            request.future.set_exception(error)

    def _break(
        self,
        reason: str,
        during: _Request | None = None,
        cls: type[NbdError] = NbdDisconnected,
    ) -> None:
        """Fail every pending request, close the socket, refuse further commands."""
        if self._broken is None:
            self._broken = reason
        pending, self._pending = self._pending, {}
        if during is not None and during not in pending.values():
            pending[0] = during
        for request in pending.values():
            self._fail_request(request, cls(f"{reason} during {request.describe()}"))
        if asyncio.current_task() is self._reader_task or self._reader_task.done():
            self._sock.close()
        else:
            # Stop the reader first (its socket wait unregisters); it closes the socket.
            self._reader_task.cancel()

    # --- closing -----------------------------------------------------------------------

    async def close(self) -> None:
        """Send NBD_CMD_DISC (the server finishes pending requests), then close. Idempotent."""
        if self._closing:
            await asyncio.wait([self._reader_task])
            return
        self._closing = True
        if self._broken is None:
            disc = _REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0)
            await asyncio.shield(self._loop.create_task(self._send(disc, None)))
            if self._broken is None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)
                # The server closes once it has answered what is in flight.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._reader_task), timeout=5)
        if not self._reader_task.done():
            self._reader_task.cancel()
        await asyncio.wait([self._reader_task])
        self._break(f"the connection to the NBD server at {self._where} is closed")

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _append(extents: list[Extent], offset: int, length: int, flags: int) -> None:
    """Append an extent, merging it into the last one when adjacent with equal flags."""
    if extents:
        last = extents[-1]
        if last.flags == flags and last.offset + last.length == offset:
            extents[-1] = Extent(last.offset, last.length + length, flags)
            return
    extents.append(Extent(offset, length, flags))


async def _open_socket(
    loop: asyncio.AbstractEventLoop, address: str | tuple[str, int], where: str
) -> socket.socket:
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[object, ...] = address
        else:
            infos = await loop.getaddrinfo(*address, type=socket.SOCK_STREAM)
            family, kind, proto, _, target = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise NbdDisconnected(f"cannot connect to the NBD server at {where}: {exc}") from exc
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, target)
    except OSError as exc:
        sock.close()
        raise NbdDisconnected(f"cannot connect to the NBD server at {where}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


class _Handshake:
    """The fixed newstyle negotiation, up to the transmission phase."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, where: str, export: str
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.reader = _SocketReader(loop, sock)
        self.where = where
        self.export = export
        self.step = "the greeting"

    async def run(self, contexts: list[str]) -> NbdClient:
        try:
            return await self._negotiate(contexts)
        except _Closed:
            raise NbdDisconnected(
                f"the NBD server at {self.where} closed the connection during the handshake "
                f"({self.step})"
            ) from None
        except OSError as exc:
            raise NbdDisconnected(
                f"the connection to the NBD server at {self.where} broke during the "
                f"handshake ({self.step}): {exc}"
            ) from exc
        except _ProtocolError as exc:
            raise NbdError(
                f"the NBD server at {self.where} broke the protocol during the handshake "
                f"({self.step}): {exc}"
            ) from None
        except NbdError:
            # A refusal: say goodbye politely (the server answers, we need not listen).
            with contextlib.suppress(OSError):
                self.sock.send(_OPT_HEADER.pack(_IHAVEOPT, _OPT_ABORT, 0))
            raise

    async def _negotiate(self, contexts: list[str]) -> NbdClient:
        magic, second, handshake_flags = struct.unpack(">QQH", await self.reader.read(18))
        if magic != _NBDMAGIC:
            raise _ProtocolError("not an NBD server (no NBDMAGIC)")
        if second == _OLDSTYLE_MAGIC or not handshake_flags & _FLAG_FIXED_NEWSTYLE:
            raise _ProtocolError("the server only speaks the old handshake, which is unsupported")
        if second != _IHAVEOPT:
            raise _ProtocolError(f"bad handshake magic 0x{second:x}")
        client_flags = _FLAG_FIXED_NEWSTYLE | (handshake_flags & _FLAG_NO_ZEROES)
        await self.loop.sock_sendall(self.sock, struct.pack(">I", client_flags))

        self.step = "NBD_OPT_STRUCTURED_REPLY"
        reply, _ = await self._option(_OPT_STRUCTURED_REPLY, b"", accept=(_REP_ERR_UNSUP,))
        structured = reply == _REP_ACK
        if contexts and not structured:
            raise NbdError(
                f"the NBD server at {self.where} refused structured replies, which "
                f"block status needs (asked for {', '.join(contexts)})"
            )

        agreed: dict[str, int] = {}
        if contexts:
            self.step = "NBD_OPT_SET_META_CONTEXT"
            name = self.export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
            for context in contexts:
                data += struct.pack(">I", len(context.encode())) + context.encode()
            await self._send_option(_OPT_SET_META_CONTEXT, data)
            while True:
                reply, payload = await self._option_reply(_OPT_SET_META_CONTEXT)
                if reply == _REP_ACK:
                    break
                if reply != _REP_META_CONTEXT or len(payload) < 4:
                    raise _ProtocolError(f"unexpected reply {reply} to {self.step}")
                (cid,) = struct.unpack_from(">I", payload)
                agreed[payload[4:].decode("utf-8", "replace")] = cid
            missing = [c for c in contexts if c not in agreed]
            if missing:
                raise NbdError(
                    f"the NBD server at {self.where} does not offer the meta context "
                    f"{', '.join(missing)} for export {self.export!r}"
                )

        self.step = "NBD_OPT_GO"
        name = self.export.encode()
        await self._send_option(_OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        size: int | None = None
        transmission_flags = 0
        while True:
            reply, payload = await self._option_reply(_OPT_GO)
            if reply == _REP_ACK:
                break
            if reply != _REP_INFO or len(payload) < 2:
                raise _ProtocolError(f"unexpected reply {reply} to {self.step}")
            (info,) = struct.unpack_from(">H", payload)
            if info == _INFO_EXPORT:
                if len(payload) != 12:
                    raise _ProtocolError("a malformed NBD_INFO_EXPORT")
                size, transmission_flags = struct.unpack_from(">QH", payload, 2)
        if size is None:
            raise _ProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
        ordered = {c: agreed[c] for c in contexts}
        return NbdClient(
            self.loop,
            self.sock,
            self.reader,
            self.where,
            self.export,
            size,
            transmission_flags,
            ordered,
            structured,
        )

    async def _send_option(self, option: int, data: bytes) -> None:
        header = _OPT_HEADER.pack(_IHAVEOPT, option, len(data))
        await self.loop.sock_sendall(self.sock, header + data)

    async def _option(
        self, option: int, data: bytes, accept: tuple[int, ...] = ()
    ) -> tuple[int, bytearray]:
        await self._send_option(option, data)
        return await self._option_reply(option, accept)

    async def _option_reply(
        self, option: int, accept: tuple[int, ...] = ()
    ) -> tuple[int, bytearray]:
        """One reply to ``option``; error replies not in ``accept`` raise NbdError."""
        header = await self.reader.read(_OPT_REPLY.size)
        magic, echoed, reply, length = _OPT_REPLY.unpack(header)
        if magic != _OPT_REPLY_MAGIC or echoed != option:
            raise _ProtocolError(f"bad option reply (magic 0x{magic:x}, option {echoed})")
        if length > _MAX_OPTION_REPLY:
            raise _ProtocolError(f"an option reply of {length} bytes")
        payload = await self.reader.read(length)
        if reply & _REP_ERR and reply not in accept:
            raise self._refused(option, reply, payload.decode("utf-8", "replace"))
        return reply, payload

    def _refused(self, option: int, reply: int, message: str) -> NbdError:
        said = f": {message}" if message else ""
        if reply == _REP_ERR_UNKNOWN and option == _OPT_GO:
            text = f"the NBD server at {self.where} has no export named {self.export!r}"
        elif reply == _REP_ERR_TLS_REQD:
            text = f"the NBD server at {self.where} requires TLS, which this client lacks"
        else:
            error = _REP_ERR_NAMES.get(reply, f"error {reply & ~_REP_ERR}")
            text = (
                f"the NBD server at {self.where} refused {_OPT_NAMES[option]} for export "
                f"{self.export!r} ({error})"
            )
        return NbdError(text + said)
