// Drive the demo page in the system's headless Chromium (playwright-core, no downloaded browser)
// and print one JSON object on stdout. Used by tests/test_mobile_web.py.
//
//   node drive.mjs generate PAGE_URL [--screenshot out.png] [--timeout 300]
//       -> {result: window.edgellmResult, error, crossOriginIsolated, console: [...]}
//   node drive.mjs tokenize PAGE_URL --corpus corpus.json [--patterns patterns.json]
//       -> {ids: [[...] per text], ids_special, decoded, pattern, splits: [per pattern [per text [pieces]]]}
//   (PAGE_URL for tokenize should carry load=tokenizer; corpus.json is a JSON list of strings)
import { chromium } from "playwright-core";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [cmd, pageUrl, ...rest] = process.argv.slice(2);
const opt = {};
for (let i = 0; i < rest.length; i += 2) opt[rest[i].replace(/^--/, "")] = rest[i + 1];
if (!["generate", "tokenize"].includes(cmd) || !pageUrl) {
  console.error("usage: node drive.mjs generate|tokenize PAGE_URL [--screenshot F] [--corpus F] [--timeout S]");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const timeoutMs = 1000 * Number(opt.timeout || 300);
const profile = mkdtempSync(join(tmpdir(), "edgellm-chromium-"));
const logs = [];
let browser;
try {
  // a fresh --user-data-dir: playwright passes it for a persistent context
  browser = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 412, height: 915 }, // a phone-sized page
  });
  const page = browser.pages()[0] ?? await browser.newPage();
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`.slice(0, 500)));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`.slice(0, 500)));
  await page.goto(pageUrl, { waitUntil: "load" });
  const out = { crossOriginIsolated: await page.evaluate(() => globalThis.crossOriginIsolated === true) };
  if (cmd === "tokenize") {
    await page.waitForFunction(() => window.edgellmTokenizer || window.edgellmError, null, { timeout: timeoutMs });
    const corpus = JSON.parse(readFileSync(opt.corpus, "utf8"));
    const patterns = opt.patterns ? JSON.parse(readFileSync(opt.patterns, "utf8")) : [];
    Object.assign(out, await page.evaluate(async ([texts, pats]) => {
      if (window.edgellmError) return { error: window.edgellmError };
      const t = window.edgellmTokenizer;
      const { toJsPattern } = await import("./tokenizer.js");
      const splits = pats.map((p) => {
        const re = new RegExp(toJsPattern(p), "gu");
        return texts.map((s) => Array.from(s.matchAll(re), (m) => m[0]));
      });
      return {
        pattern: t.patStr,
        ids: texts.map((s) => t.encode(s, false)),
        ids_special: texts.map((s) => t.encode(s, true)),
        decoded: texts.map((s) => t.decode(t.encode(s, false))),
        converted: pats.map(toJsPattern),
        splits,
      };
    }, [corpus, patterns]));
  } else {
    await page.waitForFunction(() => window.edgellmResult || window.edgellmError, null, { timeout: timeoutMs, polling: 250 });
    Object.assign(out, await page.evaluate(() => ({ result: window.edgellmResult ?? null, error: window.edgellmError ?? null })));
    if (opt.screenshot) {
      await page.screenshot({ path: opt.screenshot, fullPage: true });
      out.screenshot = opt.screenshot;
    }
  }
  out.console = logs.slice(-40);
  process.stdout.write(JSON.stringify(out) + "\n");
} catch (e) {
  process.stdout.write(JSON.stringify({ error: `driver: ${e.message}`, console: logs.slice(-40) }) + "\n");
  process.exitCode = 1;
} finally {
  await browser?.close();
  rmSync(profile, { recursive: true, force: true });
}
