// The playground page in headless Chromium (Debian's /usr/bin/chromium), served
// from a local server; the screenshot is kept in test-artifacts/.
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { createServer } from "node:http";
import { extname, join, normalize } from "node:path";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";
import { repo } from "./helpers.mjs";

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };
const artifacts = join(repo, "wasm-pkg/test-artifacts");

let server;
let browser;
let base;

before(async () => {
  server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    const file = join(repo, path.endsWith("/") ? `${path}index.html` : path);
    try {
      const body = readFileSync(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  server?.close();
});

test("the playground draws the decision for a policy and a URL", async () => {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${base}/wasm-pkg/playground/`);
  await page.waitForSelector("body[data-ready=true]");

  await page.selectOption("#example", "www.example.com.json");
  await page.waitForFunction(() => document.querySelector("#policy").value.includes("backup.example.net"));
  await page.fill("#url", "www.example.com/index.html");
  await page.selectOption("#scheme", "http");
  await page.click("#explain");
  assert.equal(
    await page.textContent("[data-testid=origin-arrow]"),
    "http :18084 · Host www.example.com",
  );
  assert.match(await page.textContent("[data-testid=failover-arrow]"), /^on 500\/502\/503\/504 or after 3000 ms: http :18085 · Host www.example.com$/);
  assert.match(await page.textContent("[data-testid=messages]"), /valid: no errors, no warnings/);

  await page.selectOption("#example", "media.example.com.json");
  await page.waitForFunction(() => document.querySelector("#policy").value.includes("18444"));
  await page.fill("#url", "media.example.com/a.png");
  await page.selectOption("#scheme", "https");
  await page.click("#explain");
  assert.equal(
    await page.textContent("[data-testid=origin-arrow]"),
    "https :18444 · Host media.example.com · SNI media.example.com",
  );
  assert.equal(await page.textContent("[data-testid=viewer-arrow]"), "https · Host media.example.com");
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: join(artifacts, "playground.png"), fullPage: true });

  const broken = (await page.inputValue("#policy")).replace('"https_port": 18444', '"https_port": 0');
  await page.fill("#policy", broken);
  await page.click("#explain");
  assert.match(await page.textContent("[data-testid=messages]"), /error: media\.example\.com \/protocol\/https_port: port 0 is outside 1-65535/);
  assert.match(await page.textContent("[data-testid=error]"), /policy set rejected/);
  assert.deepEqual(errors, []);
});
