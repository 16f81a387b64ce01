import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { test } from "node:test";
import { validate } from "../pkg/origin_policy_js.js";
import { cli, policiesDir, repo } from "./helpers.mjs";

const invalidDir = "wasm-pkg/test/invalid/";

test("invalid policies give the CLI's errors, every one, with domain, path and fix", () => {
  const files = readdirSync(repo + invalidDir).filter((f) => f.endsWith(".json"));
  assert.ok(files.length >= 3);
  for (const f of files) {
    const source = invalidDir + f;
    const js = validate(readFileSync(repo + source, "utf8"), source);
    const native = cli(["check", "--json", source]).diagnostics;
    assert.deepEqual(js, native, f);
    assert.ok(js.some((d) => d.severity === "error"), `${f} must have errors`);
  }
});

test("every error of a policy is reported at once", () => {
  const found = validate(readFileSync(`${repo}${invalidDir}many-errors.json`, "utf8"));
  assert.deepEqual(
    found.filter((d) => d.severity === "error").map((d) => d.path).sort(),
    ["/origin_host/value", "/primary/port", "/protocol/https_port", "/surprise"],
  );
});

test("warnings carry the fix in words", () => {
  const found = validate(readFileSync(`${policiesDir}buecher.example.json`, "utf8"), "buecher.example.json");
  assert.equal(found.length, 1);
  assert.equal(found[0].severity, "warning");
  assert.equal(found[0].domain, "bücher.example");
  assert.equal(found[0].path, "/origin_sni/value");
  assert.match(found[0].fix, /certificate/);
});

test("valid examples have no errors under the edge's settings", () => {
  const settings = readFileSync(`${policiesDir}settings.json`, "utf8");
  for (const f of readdirSync(policiesDir).filter((f) => f.endsWith(".example.com.json"))) {
    const errors = validate(readFileSync(policiesDir + f, "utf8"), f, settings).filter((d) => d.severity === "error");
    assert.deepEqual(errors, [], f);
  }
});

test("without settings an origin on loopback is refused, as the edge's default refuses it", () => {
  const policy = readFileSync(`${policiesDir}static.example.com.json`, "utf8");
  const errors = validate(policy, "static.example.com.json").filter((d) => d.severity === "error");
  assert.deepEqual(errors.map((d) => d.path), ["/primary/address", "/secondary/address"]);
  assert.match(errors[0].message, /127\.0\.0\.0\/8 \(loopback\)/);
  assert.match(errors[0].fix, /origin_networks\.allow/);
});

test("text that is not JSON is one error, not a throw", () => {
  const [d] = validate("{ nope", "broken.json");
  assert.equal(d.severity, "error");
  assert.equal(d.source, "broken.json");
  assert.match(d.message, /not valid JSON/);
});
