// The playground: validate a policy and draw the origin decision for a request.
// Served from the repository root, so the example policies load from /policies/.
import init, { explain, validate } from "../pkg/origin_policy_js.js";

const EXAMPLES = [
  "media.example.com.json",
  "www.example.com.json",
  "img.example.com.json",
  "legacy.example.com.json",
  "secure.example.com.json",
  "shop.example.com.json",
  "redirect.example.com.json",
];

const $ = (id) => document.getElementById(id);

function el(tag, { dataset = {}, ...attrs } = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, attrs);
  Object.assign(node.dataset, dataset);
  for (const c of children) node.append(c);
  return node;
}

function showMessages(diagnostics) {
  const list = $("messages");
  list.replaceChildren();
  if (diagnostics.length === 0) {
    list.append(el("li", { className: "ok", textContent: "valid: no errors, no warnings" }));
  }
  for (const d of diagnostics) {
    const where = [d.domain, d.path].filter(Boolean).join(" ");
    const fix = d.fix ? ` (fix: ${d.fix})` : "";
    list.append(el("li", { className: d.severity, textContent: `${d.severity}: ${where}: ${d.message}${fix}` }));
  }
}

function hop(label, testId) {
  return el("div", { className: "arrow", textContent: label, dataset: { testid: testId } });
}

function originLabel(t) {
  const sni = t.sni ? ` · SNI ${t.sni}` : "";
  return `${t.scheme} :${t.port} · Host ${t.authority}${sni}`;
}

function drawDecision(d, viewerHost) {
  const out = $("decision");
  out.replaceChildren();
  if (d.outcome !== "origin") {
    out.append(el("p", { textContent: `${d.outcome}: ${d.error ?? d.viewer_host ?? d.domain}` }));
    out.append(el("pre", { textContent: JSON.stringify(d, null, 2) }));
    return;
  }
  const t = d.origin;
  out.append(
    el("div", { className: "path" },
      el("div", { className: "node", textContent: "client" }),
      hop(`${d.viewer_scheme} · Host ${viewerHost}`, "viewer-arrow"),
      el("div", { className: "node", textContent: `POP (${d.domain}, ${d.match})` }),
      hop(originLabel(t), "origin-arrow"),
      el("div", { className: "node", textContent: `${t.tier} origin · ${t.address}` }),
    ),
  );
  if (d.failover && d.failover.eligible) {
    const f = d.failover;
    out.append(
      el("div", { className: "path failover" },
        el("div", { className: "node", textContent: "POP" }),
        hop(`on ${f.statuses.join("/")} or after ${t.response_timeout_ms} ms: ${originLabel(f)}`, "failover-arrow"),
        el("div", { className: "node secondary", textContent: `${f.tier} origin · ${f.address}` }),
      ),
    );
  } else if (d.failover) {
    out.append(el("p", { className: "note", textContent: `no failover: ${d.failover.reason}` }));
  }
  const cache = Object.entries(d.cache).map(([s, v]) => `${s} → ${v}`).join(", ") || "origin headers kept";
  out.append(el("p", { className: "note", textContent: `rule: ${d.rule}` }));
  out.append(el("p", { className: "note", textContent: `cache: ${cache}` }));
}

function run() {
  const policy = $("policy").value;
  let diagnostics = [];
  try {
    const doc = JSON.parse(policy);
    // Messages are per policy document, as the CLI reports them per file.
    const docs = Array.isArray(doc) ? doc : doc.policies ?? [doc];
    // A bundled `{settings, policies}` brings the edge's origin networks.
    const settings = doc.settings ? JSON.stringify(doc.settings) : undefined;
    diagnostics = docs.flatMap((p, i) => validate(JSON.stringify(p), `policy[${i}]`, settings));
  } catch {
    diagnostics = validate(policy, "policy");
  }
  showMessages(diagnostics);
  const rest = $("url").value.trim().replace(/^[a-z]+:\/\//i, "");
  const url = `${$("scheme").value}://${rest}`;
  try {
    drawDecision(explain(policy, { url, method: $("method").value }), rest.split(/[/?#]/)[0]);
  } catch (e) {
    $("decision").replaceChildren(el("p", { className: "error", textContent: e.message, dataset: { testid: "error" } }));
  }
}

async function loadExample(name) {
  const response = await fetch(`/policies/${name}`);
  $("policy").value = await response.text();
  $("url").value = `${name.replace(/^img\./, "cdn.img.").replace(/\.json$/, "")}/index.html`;
}

await init();
for (const name of EXAMPLES) $("example").append(el("option", { value: name, textContent: name }));
$("example").addEventListener("change", async (e) => { await loadExample(e.target.value); run(); });
$("explain").addEventListener("click", run);
await loadExample(EXAMPLES[0]);
document.body.dataset.ready = "true";
