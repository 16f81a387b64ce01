// Type-checked against the generated .d.ts (tsc --noEmit): what a console or
// CI pipeline written in TypeScript would write.
import { explain, initSync, validate, type Decision, type Diagnostic } from "../pkg/origin_policy_js.js";

declare const wasmBytes: BufferSource;
initSync({ module: wasmBytes });

const found: Diagnostic[] = validate('{"domain": "a.example.com"}', "a.json");
const paths: string[] = found.filter((d) => d.severity === "error").map((d) => d.path);

const decision: Decision = explain("[]", { url: "https://a.example.com/", method: "GET" });
if (decision.outcome === "origin") {
  const port: number = decision.origin.port;
  const sni: string | null = decision.origin.sni;
  const rule: string = decision.rule;
  console.log(port, sni, rule, paths);
}
explain("[]", { authority: "a.example.com", scheme: "http" });
