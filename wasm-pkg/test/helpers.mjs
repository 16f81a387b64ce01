// Loads the generated package and reads the repository's policies, as a
// console or CI pipeline would.
import { execFileSync } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { initSync } from "../pkg/origin_policy_js.js";

export const repo = fileURLToPath(new URL("../../", import.meta.url));
export const policiesDir = `${repo}policies/`;

initSync({ module: readFileSync(new URL("../pkg/origin_policy_js_bg.wasm", import.meta.url)) });

/** `{settings, policies}` from policies/, the shape `origin-policy bundle` writes. */
export function examplePolicySet() {
  const files = readdirSync(policiesDir)
    .filter((f) => f.endsWith(".json") && f !== "settings.json" && f !== "policy.schema.json")
    .sort();
  return JSON.stringify({
    settings: JSON.parse(readFileSync(`${policiesDir}settings.json`, "utf8")),
    policies: files.map((f) => JSON.parse(readFileSync(policiesDir + f, "utf8"))),
  });
}

/** The native CLI's JSON answer (it exits 1 when policies are rejected). */
export function cli(args) {
  try {
    return JSON.parse(execFileSync(`${repo}target/debug/origin-policy`, args, { cwd: repo, encoding: "utf8" }));
  } catch (e) {
    if (e.stdout) return JSON.parse(e.stdout);
    throw e;
  }
}

/** Where `actual` differs from `expected`, looking only at keys `expected` names. */
export function subsetMismatches(expected, actual, path = "") {
  if (expected !== null && typeof expected === "object" && !Array.isArray(expected)) {
    if (actual === null || typeof actual !== "object") return [`${path}: expected an object, got ${JSON.stringify(actual)}`];
    return Object.entries(expected).flatMap(([k, v]) =>
      k in actual ? subsetMismatches(v, actual[k], `${path}/${k}`) : [`${path}/${k}: missing`],
    );
  }
  return JSON.stringify(expected) === JSON.stringify(actual)
    ? []
    : [`${path}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`];
}
