"""ReadCache's bookkeeping (pure logic; the real feed is tested in tests/api/test_read_cache.py)."""

from __future__ import annotations

import uuid

import pytest

from app.auth.service import Principal
from app.cache import MAX_PAGES, MAX_POLICY_MARKS, CachedToken, ReadCache, Tag


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
    cache.keep_page("page", Tag(0, 0, None), (), b"x")  # a tag from before it went down
    assert cache.page("page") is None
    assert cache.token_generation() is None
    cache.keep_token("digest", 0, _token())
    assert cache.token("digest") is None


def test_an_owner_change_retires_that_owners_pages_and_every_admin_page() -> None:
    cache = _live()
    mine, theirs, everyone = cache.tag("a"), cache.tag("b"), cache.tag(None)
    assert mine is not None and theirs is not None and everyone is not None
    cache.keep_page("a-page", mine, ("a1",), b"a")
    cache.keep_page("b-page", theirs, ("b1",), b"b")
    cache.keep_page("all-page", everyone, ("a1", "b1"), b"all")
    cache.changed("o:a")
    assert cache.page("a-page") is None
    assert cache.page("b-page") == b"b"
    assert cache.page("all-page") is None


def test_a_policy_change_retires_only_the_pages_that_show_it() -> None:
    cache = _live()
    mine, everyone = cache.tag("a"), cache.tag(None)
    assert mine is not None and everyone is not None
    cache.keep_page("a-first", mine, ("a1", "a2"), b"a1 a2")
    cache.keep_page("a-second", mine, ("a3",), b"a3")
    cache.keep_page("all-first", everyone, ("a1", "b1"), b"a1 b1")
    cache.keep_page("all-second", everyone, ("a2", "a3"), b"a2 a3")
    cache.changed("p:a1")
    assert cache.page("a-first") is None and cache.page("all-first") is None
    assert cache.page("a-second") == b"a3" and cache.page("all-second") == b"a2 a3"
    later = cache.tag(None)
    assert later is not None
    cache.keep_page("all-first", later, ("a1", "b1"), b"a1' b1")  # queried after the change
    assert cache.page("all-first") == b"a1' b1"
    cache.changed("p:a1")
    assert cache.page("all-first") is None


def test_a_page_read_during_a_change_is_never_served_after_it() -> None:
    for change in ("o:a", "p:a1"):
        cache = _live()
        tag = cache.tag("a")  # taken before the query ...
        assert tag is not None
        cache.changed(change)  # ... a change commits and is notified while it runs ...
        cache.keep_page("page", tag, ("a1",), b"maybe older")  # ... then it is kept
        assert cache.page("page") is None, change


def test_too_many_marked_policies_reset_rather_than_grow() -> None:
    cache = _live()
    tag = cache.tag(None)
    assert tag is not None
    cache.keep_page("page", tag, ("x",), b"x")
    for n in range(MAX_POLICY_MARKS):
        cache.changed(f"p:{n}")
    assert cache.page("page") == b"x"  # none of the marked policies is on it
    cache.changed("p:one more")
    assert cache.page("page") is None
    assert len(cache._policies) == 1


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
    cache.keep_page("page", tag, (), b"x")
    cache.keep_token("digest", cache.token_generation(), _token())  # type: ignore[arg-type]
    cache.changed("something new")
    assert cache.page("page") is None
    assert cache.token("digest") is None


def test_pages_are_bounded_oldest_out() -> None:
    cache = _live()
    tag = cache.tag(None)
    assert tag is not None
    for n in range(MAX_PAGES + 1):
        cache.keep_page(n, tag, (), b"x")
    assert cache.page(0) is None
    assert cache.page(1) == b"x" and cache.page(MAX_PAGES) == b"x"


def test_a_page_being_read_is_announced_and_released_however_the_read_ends() -> None:
    cache = _live()
    assert cache.flight("page") is None
    tag = cache.tag("a")
    assert tag is not None
    with cache.leading("page"):
        flight = cache.flight("page")
        assert flight is not None and not flight.is_set()  # others wait for this read
        cache.keep_page("page", tag, ("a1",), b"read")
    assert flight.is_set() and cache.flight("page") is None
    assert cache.page("page") == b"read"  # what the waiters then take

    # A change notified during the read: the waiters find no page and read it themselves.
    tag = cache.tag("a")
    assert tag is not None
    with cache.leading("other"):
        cache.changed("p:a1")
        cache.keep_page("other", tag, ("a1",), b"maybe older")
    assert cache.page("other") is None

    # A read that fails (or whose client went away) still releases its waiters.
    with pytest.raises(RuntimeError), cache.leading("failing"):
        flight = cache.flight("failing")
        raise RuntimeError("database gone")
    assert flight is not None and flight.is_set() and cache.flight("failing") is None
