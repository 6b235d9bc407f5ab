"""In-process caches of the hottest reads, kept true by the database's change notifications.

What is cached: who a bearer token is (`Principal`), and policy-list pages. Triggers
(migrations 0004, 0005) NOTIFY channel `ibp_changes` when a transaction that changes what these
hold commits, from any writer: `o:<owner id>` when which policies an owner's list holds may
change (a policy created, deleted, moved to another owner or paused/resumed; the owner's
timezone), `p:<policy id>` when only what one listed policy shows changes (an edit, its next
run, an instance attached), `t` when tokens or roles do. One LISTEN connection per process
(`follow_changes`) applies them. A `p:` retires only the pages that hold that policy, so the
tick advancing `next_run_at` here and there does not empty an admin's cache.

The rules that keep a cached answer from ever being older than what it replaced:
- Nothing is cached while the LISTEN connection is down, and everything is dropped whenever it
  goes down or comes back (notifications may have been missed in between).
- An entry is tagged with the generation read *before* its database query, so a change that
  commits during the query makes the entry unreachable, whichever arrives first.
- A request of this process that may write (not GET or HEAD) drops everything once it has
  committed: a client reads its own writes at once. Writes by other processes (the worker,
  other API processes) are seen when their notification arrives: milliseconds.
- Requests that miss a page while another request is reading it wait for that read, then take
  the page only if it passes the same checks as any cached page; otherwise they read it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

if TYPE_CHECKING:
    from app.auth.service import Principal

log = logging.getLogger(__name__)

CHANNEL = "ibp_changes"
MAX_PAGES = 256  # a 50-item page is ~30 KB: a few MB at most
MAX_TOKENS = 10_000
MAX_POLICY_MARKS = 100_000  # policies changed since the last reset; beyond it, reset
PING_SECONDS = 10.0
FEED_APPLICATION_NAME = "ibp-change-feed"  # how operators spot it in pg_stat_activity


@dataclass(frozen=True, slots=True)
class Tag:
    """Taken before a page's query: what the page may have missed is any change after it."""

    epoch: int
    generation: int
    owner: str | None  # whose pages: one owner's, or everyone's (None)


@dataclass(slots=True)
class CachedToken:
    principal: Principal
    token_id: Any
    expires_at: datetime | None
    last_used_at: datetime | None


class ReadCache:
    def __init__(self) -> None:
        self.live = False
        self._epoch = 0  # bumped by reset(): every earlier tag is dead
        self._generation = 0  # bumped by every page change
        self._owners: dict[str, int] = {}  # owner id -> generation of its last list change
        self._any_owner = 0  # generation of the last list change of any owner
        self._policies: dict[str, int] = {}  # policy id -> generation of its last change
        self._token_generation = 0
        self._tokens: dict[str, CachedToken] = {}
        self._pages: dict[Hashable, tuple[Tag, tuple[str, ...], bytes]] = {}
        self._flights: dict[Hashable, asyncio.Event] = {}  # pages being read, by key

    def reset(self) -> None:
        self._epoch += 1
        self._owners.clear()
        self._policies.clear()
        self._pages.clear()
        self._drop_tokens()

    def _drop_tokens(self) -> None:
        self._token_generation += 1
        self._tokens.clear()

    def changed(self, payload: str) -> None:
        """Apply one notification."""
        if payload == "t":
            self._drop_tokens()
        elif payload.startswith("p:"):
            if len(self._policies) >= MAX_POLICY_MARKS:
                self.reset()
            self._generation += 1
            self._policies[payload[2:]] = self._generation
        elif payload.startswith("o:"):
            self._generation += 1
            self._owners[payload[2:]] = self._any_owner = self._generation
        else:  # unknown: be safe
            self.reset()

    # Pages -------------------------------------------------------------------------------

    def tag(self, owner_id: str | None) -> Tag | None:
        """Take before querying a page of one owner's rows, or everyone's (None).
        None: the cache is not live, do not keep the page."""
        return Tag(self._epoch, self._generation, owner_id) if self.live else None

    def page(self, key: Hashable) -> bytes | None:
        """The page kept under `key`, unless a change it may have missed has arrived since."""
        entry = self._pages.get(key) if self.live else None
        if entry is None:
            return None
        tag, ids, body = entry
        if tag.epoch != self._epoch:
            return None
        owner = self._any_owner if tag.owner is None else self._owners.get(tag.owner, 0)
        if owner > tag.generation:
            return None
        if self._policies:
            marks = self._policies
            if any(marks.get(policy_id, 0) > tag.generation for policy_id in ids):
                return None
        return body

    def keep_page(self, key: Hashable, tag: Tag, ids: tuple[str, ...], body: bytes) -> None:
        """Keep a page queried after `tag` was taken; `ids`: the policies it shows."""
        if self._pages.pop(key, None) is None and len(self._pages) >= MAX_PAGES:
            del self._pages[next(iter(self._pages))]  # the oldest
        self._pages[key] = (tag, ids, body)

    def flight(self, key: Hashable) -> asyncio.Event | None:
        """Set when the read of page `key` now under way ends (None: none is)."""
        return self._flights.get(key)

    @contextmanager
    def leading(self, key: Hashable) -> Iterator[None]:
        """Mark page `key` as being read for the duration, so that requests for it that miss
        meanwhile wait for this read instead of all asking the database (a page retired under
        32 concurrent readers would otherwise cost 32 identical queries at once)."""
        event = asyncio.Event()
        self._flights[key] = event
        try:
            yield
        finally:
            if self._flights.get(key) is event:
                del self._flights[key]
            event.set()

    # Tokens ------------------------------------------------------------------------------

    def token_generation(self) -> int | None:
        return self._token_generation if self.live else None

    def token(self, digest: str) -> CachedToken | None:
        return self._tokens.get(digest) if self.live else None

    def keep_token(self, digest: str, generation: int, entry: CachedToken) -> None:
        if not self.live or generation != self._token_generation:
            return  # a change arrived during the query: the row read may be older than it
        if len(self._tokens) >= MAX_TOKENS:
            del self._tokens[next(iter(self._tokens))]
        self._tokens[digest] = entry


async def follow_changes(cache: ReadCache, dsn: str) -> None:
    """Hold a LISTEN connection, keeping `cache` live exactly while it is up; runs until
    cancelled, reconnecting with backoff (1 s to 30 s)."""
    delay = 1.0
    while True:
        try:
            await _follow(cache, dsn)
            log.warning("read cache: lost the change feed; caching paused")
            delay = 1.0
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("read cache: change feed unavailable (%s); caching paused", exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


async def _follow(cache: ReadCache, dsn: str) -> None:
    """One LISTEN connection's life. A dead socket is noticed by a ping every PING_SECONDS."""
    conn = await asyncpg.connect(
        dsn, timeout=PING_SECONDS, server_settings={"application_name": FEED_APPLICATION_NAME}
    )
    lost = asyncio.Event()
    try:
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(
            CHANNEL, lambda _conn, _pid, _channel, payload: cache.changed(payload)
        )
        cache.reset()
        cache.live = True
        while not lost.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), PING_SECONDS)
            if not lost.is_set():
                await conn.fetchval("SELECT 1", timeout=PING_SECONDS)
    finally:
        cache.live = False
        cache.reset()
        conn.terminate()
