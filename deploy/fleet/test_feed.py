"""Unit tests of the control plane's policy feed (deploy/fleet/feed.py): the
pages between two snapshots, without Envoy (test_fleet.py runs it in Envoy)."""

from __future__ import annotations

import feed
from feed import PolicyFeed
from resources import Snapshot

EPOCH = 77


def snapshot(**documents: str) -> Snapshot:
    return Snapshot({}, {k.replace("_", "."): v for k, v in documents.items()})


def lines(page) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in page.body.decode().splitlines())


def test_a_change_sends_the_changed_domains_only():
    old = snapshot(a_test='{"v":1}', b_test='{"v":1}')
    new = snapshot(a_test='{"v":2}', b_test='{"v":1}', c_test='{"v":1}')
    page = PolicyFeed(EPOCH).next_page(old.feed_version, EPOCH, [old, new], new)
    assert lines(page) == {"a.test": '{"v":2}', "c.test": '{"v":1}'}
    assert (page.version, page.more, page.reset) == (new.feed_version, False, False)


def test_going_back_restores_and_removes():
    stable = snapshot(a_test='{"v":1}')
    candidate = snapshot(a_test='{"v":2}', c_test='{"v":1}')
    page = PolicyFeed(EPOCH).next_page(candidate.feed_version, EPOCH, [stable, candidate], stable)
    assert lines(page) == {"a.test": '{"v":1}', "c.test": ""}
    assert page.version == stable.feed_version and not page.reset


def test_an_unknown_version_or_epoch_gets_a_snapshot_without_removals():
    old = snapshot(a_test='{"v":1}', gone_test='{"v":1}')
    target = snapshot(a_test='{"v":2}', b_test='{"v":1}')
    source = PolicyFeed(EPOCH)
    for since, epoch in [(12345, EPOCH), (old.feed_version, EPOCH + 1), (0, None)]:
        page = source.next_page(since, epoch, [old, target], target)
        assert page.reset and lines(page) == {"a.test": '{"v":2}', "b.test": '{"v":1}'}
        assert page.version == target.feed_version


def test_nothing_to_send_waits():
    current = snapshot(a_test='{"v":1}')
    source = PolicyFeed(EPOCH)
    assert source.next_page(current.feed_version, EPOCH, [current], current) is None
    # No target yet (the Envoy lacks the target's clusters): even a new reader waits.
    assert source.next_page(0, None, [current], None) is None


def test_long_answers_are_paged_through_cursors(monkeypatch):
    monkeypatch.setattr(feed, "PAGE_DOMAINS", 2)
    target = snapshot(**{f"d{i}_test": f'{{"v":{i}}}' for i in range(5)})
    source = PolicyFeed(EPOCH)
    since, epoch, seen, pages = 0, None, {}, []
    while True:
        page = source.next_page(since, epoch, [target], target)
        pages.append(page)
        seen.update(lines(page))
        since, epoch = page.version, EPOCH
        if not page.more:
            break
    assert [p.domains for p in pages] == [2, 2, 1]
    assert [p.reset for p in pages] == [True, False, False]
    assert pages[-1].version == target.feed_version
    assert seen == dict(target.documents)
    # The reader is there now: nothing more.
    assert source.next_page(since, EPOCH, [target], target) is None


def test_versions_name_content():
    assert snapshot(a_test="{}").feed_version == snapshot(a_test="{}").feed_version
    assert snapshot(a_test="{}").feed_version != snapshot(a_test='{"v":1}').feed_version
    assert 0 < snapshot(a_test="{}").feed_version < 2**63
