"""ReadCache's bookkeeping (pure logic; the real feed is tested in tests/api/test_read_cache.py)."""

from __future__ import annotations

import uuid

from app.auth.service import Principal
from app.cache import MAX_PAGES, CachedToken, ReadCache


def _live() -> ReadCache:
    cache = ReadCache()
    cache.reset()
    cache.live = True
    return cache


def _token() -> CachedToken:
    return CachedToken(Principal(uuid.uuid4(), False), uuid.uuid4(), None, None)


def test_nothing_is_cached_while_the_feed_is_down() -> None:
    cache = ReadCache()
    assert cache.tag("owner") is None and cache.tag(None) is None
    assert cache.token_generation() is None
    cache.keep_token("digest", 0, _token())
    assert cache.token("digest") is None


def test_an_owner_change_retires_that_owners_pages_and_every_admin_page() -> None:
    cache = _live()
    mine, theirs, everyone = cache.tag("a"), cache.tag("b"), cache.tag(None)
    assert mine is not None and theirs is not None and everyone is not None
    cache.keep_page("a-page", mine, b"a")
    cache.keep_page("b-page", theirs, b"b")
    cache.keep_page("all-page", everyone, b"all")
    cache.changed("o:a")
    assert cache.tag("a") != mine
    assert cache.page("a-page", cache.tag("a")) is None  # type: ignore[arg-type]
    assert cache.page("b-page", cache.tag("b")) == b"b"  # type: ignore[arg-type]
    assert cache.page("all-page", cache.tag(None)) is None  # type: ignore[arg-type]


def test_a_page_read_during_a_change_is_never_served_after_it() -> None:
    cache = _live()
    tag = cache.tag("a")  # taken before the query ...
    assert tag is not None
    cache.changed("o:a")  # ... a change commits and is notified while it runs ...
    cache.keep_page("page", tag, b"maybe older than the change")  # ... then it is kept
    assert cache.page("page", cache.tag("a")) is None  # type: ignore[arg-type]


def test_a_token_read_during_a_token_change_is_not_kept() -> None:
    cache = _live()
    generation = cache.token_generation()
    assert generation is not None
    cache.changed("t")  # e.g. its revocation, notified while the lookup ran
    cache.keep_token("digest", generation, _token())
    assert cache.token("digest") is None
    cache.keep_token("digest", cache.token_generation(), _token())  # type: ignore[arg-type]
    assert cache.token("digest") is not None
    cache.changed("t")
    assert cache.token("digest") is None


def test_reset_forgets_everything_and_unknown_notifications_reset() -> None:
    cache = _live()
    tag = cache.tag(None)
    assert tag is not None
    cache.keep_page("page", tag, b"x")
    cache.keep_token("digest", cache.token_generation(), _token())  # type: ignore[arg-type]
    cache.changed("something new")
    assert cache.page("page", cache.tag(None)) is None  # type: ignore[arg-type]
    assert cache.token("digest") is None


def test_pages_are_bounded_oldest_out() -> None:
    cache = _live()
    tag = cache.tag(None)
    assert tag is not None
    for n in range(MAX_PAGES + 1):
        cache.keep_page(n, tag, b"x")
    assert cache.page(0, tag) is None
    assert cache.page(1, tag) == b"x" and cache.page(MAX_PAGES, tag) == b"x"
