"""Every HTTPS origin of a failover chain, primary or secondary, sends its SNI
and has its certificate checked against it, whatever rule names the SNI.

One HTTPS origin on 127.0.0.3:18443 whose certificate set names only the
`*-ok` names below (any other SNI gets a certificate for default.origin.test);
the other origin of each chain is 127.0.0.4:18443, where nothing listens.
"""

import pytest

from origins import DemoOrigins, OriginSpec

CHECKED = "127.0.0.3"
REFUSING = "127.0.0.4"
CERT_NAMES = (
    "default.origin.test",
    "sni-ok.origin.test",
    "custom-ok.sni.test",
    "host-ok.sni.test",
    "accel-ok-primary.sni.test",
    "accel-ok-secondary.sni.test",
)


@pytest.fixture(scope="module")
def checked(demo_origins):
    spec = OriginSpec("sni-checked", 18443, CERT_NAMES, address=CHECKED)
    with DemoOrigins([spec], demo_origins.certs) as origins:
        yield origins


def policy_for(rule: str, position: str, matches: bool) -> tuple[dict, str, str | None]:
    """(policy fields, the checked origin's address, the domain name or None
    for a fresh one) for one SNI rule; the SNI expected is `name`."""
    ok = "ok" if matches else "bad"
    if rule == "origin_domain":
        # SNI and Host: the origin's own name.
        return {"origin_host": {"mode": "origin_domain"}}, f"sni-{ok}.origin.test", None
    if rule == "custom_sni":
        return {"origin_sni": {"mode": "custom", "value": f"custom-{ok}.sni.test"}}, CHECKED, None
    if rule == "custom_host":
        # SNI: the Host, which the policy sets.
        return {"origin_host": {"mode": "custom", "value": f"host-{ok}.sni.test"}}, CHECKED, None
    # SNI: the Host, which is the accelerated domain itself.
    name = f"accel-{ok}-{position}.sni.test"
    return {"origin_host": {"mode": "acceleration_domain"}}, CHECKED, name


def expected_sni(rule: str, matches: bool, domain: str) -> str:
    ok = "ok" if matches else "bad"
    return {
        "origin_domain": f"sni-{ok}.origin.test",
        "custom_sni": f"custom-{ok}.sni.test",
        "custom_host": f"host-{ok}.sni.test",
    }.get(rule, domain)


RULES = ["origin_domain", "custom_sni", "custom_host", "acceleration_domain"]


@pytest.mark.parametrize("matches", [True, False], ids=["name-matches", "name-differs"])
@pytest.mark.parametrize("position", ["primary", "secondary"])
@pytest.mark.parametrize("rule", RULES)
def test_an_https_origin_in_a_chain_sends_its_sni_and_checks_it(
    edge, checked, path, rule, position, matches
):
    fields, address, name = policy_for(rule, position, matches)
    tls = {"address": address, "port": 443}
    down = {"address": REFUSING, "port": 443}
    primary, secondary = (tls, down) if position == "primary" else (down, tls)
    domain = edge.fresh_domain(
        primary,
        secondary,
        name=name,
        protocol={"policy": "https", "https_port": 18443},
        **fields,
    )
    sni = expected_sni(rule, matches, domain)
    r = edge.request(domain, path)
    decision = r.header("x-origin-decision") or ""
    reached = checked.log.matching(path)
    if matches:
        assert r.status == 200, (r.status, r.header("x-origin-error"))
        assert [s.sni for s in reached] == [sni]
        assert f"sni={sni}" in decision, decision
        assert f"origin={position}" in decision, decision
        failed_over = "orig failed; failover=secondary" if position == "secondary" else None
        assert r.header("x-origin-error") == failed_over
    else:
        # The handshake is refused: nothing reaches the origin.
        assert reached == [], [(s.sni, s.host) for s in reached]
        assert r.status == 502, r.status
        error = r.header("x-origin-error")
        if position == "primary":
            assert error.startswith("orig failed; failover=secondary; secondary connect failed"), error
        else:
            assert error == (
                "orig failed; failover=secondary; "
                "secondary TLS handshake failed (CERTIFICATE_VERIFY_FAILED)"
            ), error
