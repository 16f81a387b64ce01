import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const tsc = fileURLToPath(new URL("../node_modules/typescript/bin/tsc", import.meta.url));
const project = fileURLToPath(new URL("./tsconfig.json", import.meta.url));

test("the generated .d.ts type-checks a TypeScript usage file", () => {
  const out = spawnSync(process.execPath, [tsc, "-p", project], { encoding: "utf8" });
  assert.equal(out.status, 0, out.stdout + out.stderr);
});

test("and rejects a use the declared types forbid", () => {
  const dir = fileURLToPath(new URL("../test-artifacts/", import.meta.url));
  mkdirSync(dir, { recursive: true });
  const bad = `${dir}wrong-usage.ts`;
  // With an untyped (any) return these would compile; the .d.ts must forbid them.
  writeFileSync(
    bad,
    [
      'import { explain, validate } from "../pkg/origin_policy_js.js";',
      'const line: number = validate("{}")[0].path;',
      'explain("[]", { hostname: "a" });',
    ].join("\n"),
  );
  const out = spawnSync(
    process.execPath,
    [tsc, "--strict", "--noEmit", "--target", "es2022", "--module", "es2022", "--moduleResolution", "bundler", bad],
    { encoding: "utf8" },
  );
  assert.notEqual(out.status, 0);
  assert.match(out.stdout, /Type 'string' is not assignable to type 'number'/);
  assert.match(out.stdout, /hostname/);
});
