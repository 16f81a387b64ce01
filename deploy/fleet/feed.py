"""The control plane's policy feed: each Envoy's feed singleton long-polls
`GET /changes?since=VERSION&epoch=EPOCH` (the contract in
docs/feed.md) and gets the domains whose policy differs between the
snapshot it has and the one it should run, one `DOMAIN<TAB>DOCUMENT` line
each (an empty document removes the domain).

Versions are the snapshots' `feed_version`s, so the difference is computed
between any two snapshots the control plane knows: forward for a push, back
for a canary sent back to the stable version. A reader with a version it does
not know (another epoch, or a snapshot long gone) gets the whole target as a
snapshot. Long answers are paged; a page that is not the last carries a
cursor as its version, which the next poll continues.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import unquote

from resources import Snapshot

PAGE_DOMAINS = 10_000  # as `origin-policy feed`: one page is validated in one go
LONG_POLL_SECONDS = 20.0  # the singleton waits up to 60 s for an answer
CURSORS_KEPT = 1024
DIFFS_KEPT = 16

VERSION_HEADER = "x-feed-version"
EPOCH_HEADER = "x-feed-epoch"
MORE_HEADER = "x-feed-more"
RESET_HEADER = "x-feed-reset"
NODE_HEADER = "x-feed-node"
REJECTED_HEADER = "x-feed-rejected"


@dataclass
class FeedPage:
    version: int
    body: bytes
    more: bool
    reset: bool
    domains: int

    def headers(self, epoch: int) -> list[tuple[str, str]]:
        headers = [(VERSION_HEADER, str(self.version)), (EPOCH_HEADER, str(epoch))]
        if self.more:
            headers.append((MORE_HEADER, "1"))
        if self.reset:
            headers.append((RESET_HEADER, "1"))
        return headers


class PolicyFeed:
    """Pages between snapshots. Not thread-safe: the fleet's lock guards it."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.cursors: OrderedDict[int, tuple[Snapshot, list[str]]] = OrderedDict()
        self.diffs: OrderedDict[tuple[int, int], list[str]] = OrderedDict()

    def is_cursor(self, since: int, epoch: int | None) -> bool:
        return epoch == self.epoch and since in self.cursors

    def next_page(self, since: int, epoch: int | None, known: Iterable[Snapshot],
                  target: Snapshot | None) -> FeedPage | None:
        """What a reader at `since` gets on its way to `target`; None: nothing
        yet (no target, or the reader is there)."""
        if self.is_cursor(since, epoch):
            snapshot, todo = self.cursors.pop(since)
            return self.page(snapshot, todo, reset=False)
        if target is None:
            return None
        base = None
        if epoch == self.epoch:
            base = next((s for s in known if s.feed_version == since), None)
        if base is None:
            return self.page(target, sorted(target.documents), reset=True)
        if base.feed_version == target.feed_version:
            return None
        return self.page(target, self.changed(base, target), reset=False)

    def changed(self, base: Snapshot, target: Snapshot) -> list[str]:
        """The domains whose document differs (or exists in one only); every
        Envoy moving between the same two snapshots asks the same."""
        key = (base.feed_version, target.feed_version)
        if key not in self.diffs:
            old, new = base.documents, target.documents
            self.diffs[key] = sorted(d for d in old.keys() | new.keys() if old.get(d) != new.get(d))
            while len(self.diffs) > DIFFS_KEPT:
                self.diffs.popitem(last=False)
        return self.diffs[key]

    def page(self, snapshot: Snapshot, todo: list[str], reset: bool) -> FeedPage:
        now, rest = todo[:PAGE_DOMAINS], todo[PAGE_DOMAINS:]
        body = "".join(f"{d}\t{snapshot.documents.get(d, '')}\n" for d in now).encode()
        if not rest:
            return FeedPage(snapshot.feed_version, body, False, reset, len(now))
        cursor = secrets.randbits(63)
        self.cursors[cursor] = (snapshot, rest)
        while len(self.cursors) > CURSORS_KEPT:
            self.cursors.popitem(last=False)
        return FeedPage(cursor, body, True, reset, len(now))


def parse_rejected(header: str) -> list[str]:
    """`x-feed-rejected`: comma-separated domains, each percent-encoded past
    printable ASCII, the last item possibly `+N more` (not a domain)."""
    return [unquote(d.strip()) for d in header.split(",") if d.strip() and not d.strip().startswith("+")]
