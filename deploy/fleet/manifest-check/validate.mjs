// Validates the fleet manifests against the schemas published for them:
// Istio's WasmPlugin through @kubernetes-models/istio (generated from Istio's
// CRDs). Envoy Gateway's EnvoyExtensionPolicy has no such package here; its
// manifest only gets a check that it parses and names its kind.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { WasmPlugin } from "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin";
import { parse } from "yaml";

const here = (name) => fileURLToPath(new URL(`../${name}`, import.meta.url));

const istio = parse(readFileSync(here("istio-wasmplugin.yaml"), "utf8"));
new WasmPlugin(istio).validate(); // throws with the schema's findings
console.log(`istio-wasmplugin.yaml: valid ${istio.apiVersion} ${istio.kind}`);

const gateway = parse(readFileSync(here("envoy-gateway-extensionpolicy.yaml"), "utf8"));
if (gateway.kind !== "EnvoyExtensionPolicy" || !gateway.spec?.wasm?.length) {
  throw new Error("envoy-gateway-extensionpolicy.yaml: not an EnvoyExtensionPolicy with a wasm entry");
}
console.log("envoy-gateway-extensionpolicy.yaml: parsed (no published schema installable here: untested)");
