// Page glue: inputs / query parameters -> loadArtifact -> generate, streaming into #out.
// Query parameters (all optional): artifact, prompt, chat=0|1, max, temperature, top_p, seed,
// threads, ids=1,2,3 (prompt token ids instead of text), ignore_eos=1, autorun=1,
// load=tokenizer (only the tokenizer files; for tests). Results land on window for automation:
// window.edgellmResult = {ids, text, prefillTokS, decodeTokS, ...} or window.edgellmError.
import { loadArtifact } from "./edgellm.js";
import { Tokenizer } from "./tokenizer.js";

const $ = (id) => document.getElementById(id);
const q = new URLSearchParams(location.search);
const status = (s) => { $("status").textContent = s; };
const fmt = (x) => (x == null ? "-" : x.toFixed(1));
let engine = null;
let engineUrl = null;

for (const [param, id] of [["artifact", "artifact"], ["prompt", "prompt"], ["max", "max"], ["temperature", "temperature"], ["top_p", "topp"]]) {
  if (q.has(param)) $(id).value = q.get(param);
}
if (q.has("chat")) $("chat").checked = q.get("chat") !== "0";

function artifactUrl() {
  let a = $("artifact").value.trim();
  if (!a.endsWith("/")) a += "/";
  return new URL(a, location.href).href;
}

function fail(e) {
  console.error(e);
  window.edgellmError = String(e && e.message ? e.message : e);
  $("status").innerHTML = "";
  const span = document.createElement("span");
  span.className = "err";
  span.textContent = `error: ${window.edgellmError}`;
  $("status").append(span);
  $("run").disabled = false;
}

async function run() {
  $("run").disabled = true;
  window.edgellmResult = undefined;
  window.edgellmError = undefined;
  try {
    const url = artifactUrl();
    if (!engine || engineUrl !== url) {
      const t = performance.now();
      engine = await loadArtifact(url, { threads: Number(q.get("threads") || 0), onProgress: status });
      engineUrl = url;
      window.edgellmEngine = engine;
      status(`loaded ${engine.manifest.name} in ${((performance.now() - t) / 1000).toFixed(1)} s ` +
        `(${engine.loadInfo.threads} thread(s), sha256 ${engine.loadInfo.sha256Verified ? "verified" : "not checked"})`);
    }
    const tok = engine.tokenizer;
    let promptIds;
    if (q.has("ids")) {
      promptIds = q.get("ids").split(",").filter(Boolean).map(Number);
      $("prompt").value = tok.decode(promptIds); // show what the ids say
    } else {
      const chat = $("chat").checked;
      const text = chat ? tok.applyChatTemplate([{ role: "user", content: $("prompt").value }]) : $("prompt").value;
      promptIds = tok.encode(text, chat);
    }
    const maxNewTokens = Math.max(1, Number($("max").value) || 64);
    $("out").textContent = "";
    $("stats").textContent = `prefill of ${promptIds.length} tokens...`;
    const res = await engine.generate(promptIds, {
      maxNewTokens,
      temperature: Number($("temperature").value) || 0,
      topP: Number($("topp").value) || 1,
      seed: Number(q.get("seed") || 0),
      stopAtEos: q.get("ignore_eos") !== "1",
      onToken: ({ text, index, prefillMs, decodeMs, decodeSteps }) => {
        $("out").textContent += text;
        const pre = promptIds.length / (prefillMs / 1000);
        $("stats").textContent = `prompt ${promptIds.length} tok · prefill ${fmt(pre)} tok/s · ` +
          `decode ${decodeSteps ? fmt(decodeSteps / (decodeMs / 1000)) : "-"} tok/s · ${index + 1} generated`;
      },
    });
    $("out").textContent = res.text;
    $("stats").textContent = `prompt ${res.promptTokens} tok · prefill ${fmt(res.prefillTokS)} tok/s · ` +
      `decode ${fmt(res.decodeTokS)} tok/s · ${res.ids.length} generated`;
    window.edgellmResult = { ...res, promptIds, loadInfo: engine.loadInfo };
    $("run").disabled = false;
  } catch (e) {
    fail(e);
  }
}

async function init() {
  window.edgellmCrossOriginIsolated = globalThis.crossOriginIsolated === true;
  if (q.get("load") === "tokenizer") {
    window.edgellmTokenizer = await Tokenizer.fromUrl(artifactUrl());
    status("tokenizer loaded");
    return;
  }
  $("run").addEventListener("click", run);
  if (q.get("autorun") === "1") await run();
}

init().catch(fail);
