"""A policy source that is only a plain HTTP server speaking the feed, for
test_delivery.py: `raw_feed.py PORT PAGES_JSON POLLS_FILE` (see RawFeed)."""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

PORT, PAGES, POLLS = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]


class Feed(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        query = parse_qs(urlparse(self.path).query)
        since, epoch = int(query["since"][0]), query.get("epoch", [""])[0]
        header = self.headers.get
        poll = {
            "since": since,
            "epoch": epoch,
            "node": header("x-feed-node"),
            "rejected": header("x-feed-rejected"),
            "malformed": header("x-feed-malformed"),
            "snapshot_refused": header("x-feed-snapshot-refused"),
        }
        page = (PAGES[0] if PAGES[0].get("repeat") else PAGES.pop(0)) if PAGES else None
        # When a page went out (wall clock, as the test reads it).
        poll["page_at"] = time.time() if page is not None else None
        with open(POLLS, "a") as polls:
            polls.write(json.dumps(poll) + "\n")
        if page is None:
            # Nothing new: a long poll, short.
            time.sleep(1)
            self.send_response(204)
            self.send_header("x-feed-version", str(since))
            self.send_header("x-feed-epoch", epoch)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = page["body"].encode()
        self.send_response(200)
        version = since + 1 if page.get("advance", True) else since
        self.send_header("x-feed-version", str(version))
        self.send_header("x-feed-epoch", epoch or "1")
        if page.get("more"):
            self.send_header("x-feed-more", "1")
        if page.get("reset"):
            self.send_header("x-feed-reset", "1")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("127.0.0.1", PORT), Feed).serve_forever()
