"""The 301 loop (seed FAQ) behind Envoy's own HTTP cache filter (scenario 6)."""

import pytest


def fetch_twice(edge, domain, path):
    first = edge.request(domain, path)
    second = edge.request(domain, path)
    return first, second, len(edge.seen(path))


def test_without_the_rule_the_301_is_served_from_cache(edge, path):
    first, second, reached = fetch_twice(edge, "cached-redirect.test", path)
    assert (first.status, second.status) == (301, 301)
    assert first.header("cache-control") == "max-age=3600"
    assert reached == 1, "the second request must have been a cache hit"
    assert second.header("age") is not None


def test_without_the_rule_a_302_keeps_the_origins_max_age(edge, path):
    # Envoy's cache never stores a 302 (not in its list of cacheable statuses),
    # but every cache after the edge would keep it for the hour the origin asked.
    first, second, reached = fetch_twice(edge, "cached-redirect.test", "/found" + path)
    assert (first.status, second.status) == (302, 302)
    assert (first.header("cache-control"), second.header("cache-control")) == (
        "max-age=3600",
        "max-age=3600",
    )


@pytest.mark.parametrize("status, prefix", [(301, "/"), (302, "/found/")])
def test_with_the_rule_every_redirect_reaches_the_origin(edge, path, status, prefix):
    first, second, reached = fetch_twice(edge, "redirect.example.com", prefix.rstrip("/") + path)
    assert (first.status, second.status) == (status, status)
    assert first.header("cache-control") == "no-store"
    assert first.header("location") == f"https://redirect.example.com{prefix.rstrip('/')}{path}"
    assert reached == 2


def test_a_200_is_still_cached_under_the_rule(edge, path):
    first, second, reached = fetch_twice(edge, "redirect.example.com", "/page" + path)
    assert (first.status, second.status) == (200, 200)
    assert first.header("cache-control") == "max-age=3600"
    assert reached == 1
