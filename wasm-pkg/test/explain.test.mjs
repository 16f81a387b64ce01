import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { explain } from "../pkg/origin_policy_js.js";
import { cli, examplePolicySet, policiesDir, subsetMismatches } from "./helpers.mjs";

const cases = JSON.parse(readFileSync(`${policiesDir}golden/cases.json`, "utf8")).cases;
const set = examplePolicySet();

test("every golden case gives the expected decision", () => {
  assert.ok(cases.length >= 20);
  const failures = cases.flatMap((c) =>
    subsetMismatches(c.expect, explain(set, c.request)).map((m) => `${c.name}: ${m}`),
  );
  assert.deepEqual(failures, []);
});

test("decisions equal the native CLI's explain --json, field for field", () => {
  let compared = 0;
  for (const c of cases) {
    const { authority, scheme, method, x_forwarded_proto } = c.request;
    if (!scheme) continue; // the CLI takes a URL, which needs a scheme
    const url = `${scheme}://${authority}/`;
    const args = ["explain", "--json", "--policies", "policies", url];
    if (method) args.push("--method", method);
    if (x_forwarded_proto) args.push("--x-forwarded-proto", x_forwarded_proto);
    assert.deepEqual(explain(set, { url, method, x_forwarded_proto }), cli(args), c.name);
    compared += 1;
  }
  assert.ok(compared >= 20, `only ${compared} cases compared`);
});

test("one policy or a list is accepted as a policy set", () => {
  const legacy = readFileSync(`${policiesDir}legacy.example.com.json`, "utf8");
  const one = explain(legacy, { url: "http://legacy.example.com/x" });
  assert.equal(one.origin.port, 8150);
  assert.equal(one.origin.authority, "legacy-origin.example.net:8150");
  assert.match(one.rule, /protocol policy http/);
  const list = explain(`[${legacy}]`, { url: "http://nope.example.com/" });
  assert.equal(list.outcome, "unknown_domain");
});

test("bad input throws an Error with the reason, never a trap", () => {
  assert.throws(() => explain("{", { url: "http://a/" }), (e) => e instanceof Error && /not valid JSON/.test(e.message));
  assert.throws(
    () => explain('{"domain": "a.example.com", "primary": {"address": "o", "port": 0}}', { url: "http://a.example.com/" }),
    (e) => e instanceof Error && /a\.example\.com: \/primary\/port: port 0 is outside 1-65535/.test(e.message),
  );
  assert.throws(() => explain(set, { url: "no-scheme" }), (e) => e instanceof Error && /not a URL/.test(e.message));
  assert.throws(() => explain(set, { host: "x" }), (e) => e instanceof Error && /unknown request field `host`/.test(e.message));
  // The module still works after every one of those.
  assert.equal(explain(set, { url: "https://secure.example.com/" }).origin.sni, "origin-secure.example.net");
});
