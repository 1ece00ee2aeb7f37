// Run an edgellm ONNX artifact with onnxruntime-web (wasm): load, prefill, decode, sample.
//
// The model contract is the one export/to_onnx.py writes and runtime/onnx_backend.py runs:
// inputs input_ids int64[1,T], position_ids int64[T], n_valid int64[] (= cache slots filled
// after this call), past_key_i / past_value_i float32[1,Hkv,capacity,D]; outputs logits
// float32[1,T,vocab] and present_key_i / present_value_i, which become the next call's past.
// Everything else (capacity, eos ids, names, cache shape) is read from manifest.json.
import * as ort from "onnxruntime-web";
import { Tokenizer } from "./tokenizer.js";

export class CacheOverflowError extends Error {}

async function fetchOk(url, what) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${what}: HTTP ${r.status} for ${url}; check the artifact URL`);
  return r;
}

/** fetch() a file into a Uint8Array, reporting (loaded, total) bytes. */
async function fetchBytes(url, what, onBytes) {
  const r = await fetchOk(url, what);
  const total = Number(r.headers.get("content-length")) || 0;
  if (!r.body || !onBytes) return new Uint8Array(await r.arrayBuffer());
  const reader = r.body.getReader();
  const chunks = [];
  let n = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    n += value.length;
    onBytes(n, total);
  }
  const out = new Uint8Array(n);
  let o = 0;
  for (const c of chunks) { out.set(c, o); o += c.length; }
  return out;
}

async function sha256Hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A tiny seeded PRNG (mulberry32) so sampled runs are reproducible. */
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function argmax(x) {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** Temperature + nucleus (top-p) sampling; temperature <= 0 is greedy. */
export function sample(logits, { temperature = 0, topP = 1, random = Math.random } = {}) {
  if (!(temperature > 0)) return argmax(logits);
  const m = logits[argmax(logits)];
  const idx = [];
  const p = [];
  let z = 0;
  for (let i = 0; i < logits.length; i++) {
    const e = Math.exp((logits[i] - m) / temperature);
    if (e > 1e-12) { idx.push(i); p.push(e); z += e; }
  }
  const order = idx.map((_, k) => k).sort((a, b) => p[b] - p[a]);
  let keep = [];
  let mass = 0;
  for (const k of order) {
    keep.push(k);
    mass += p[k] / z;
    if (mass >= topP) break;
  }
  let r = random() * keep.reduce((s, k) => s + p[k], 0);
  for (const k of keep) { r -= p[k]; if (r <= 0) return idx[k]; }
  return idx[keep[keep.length - 1]];
}

export class Engine {
  constructor(session, manifest, tokenizer) {
    this.session = session;
    this.manifest = manifest;
    this.tokenizer = tokenizer;
    this.maxSeqLen = manifest.max_seq_len;
    const io = manifest.onnx || {};
    const cfg = manifest.config || {};
    this.inputNames = io.inputs || session.inputNames;
    this.outputNames = io.outputs || session.outputNames;
    this.pastNames = this.inputNames.filter((n) => n.startsWith("past_"));
    this.cacheShape = io.cache_shape || [1, cfg.n_kv_heads, this.maxSeqLen, cfg.head_dim];
    // fp16/int8 caches: each past input's own type and shape (int8 scales are [1,Hkv,S,1])
    this.cacheInputs = io.cache_inputs || {};
    // A windowed cache (kv_cache.window) never overflows: its ring keeps the recent positions, and a
    // call takes at most a quarter of the ring (ModelConfig.max_chunk).
    const kv = cfg.kv_cache || {};
    this.windowed = kv.window !== undefined && kv.window !== null;
    this.sinks = this.windowed ? kv.sinks || 0 : 0;
    this.ring = this.windowed ? kv.window - this.sinks : null;
    this.maxChunk = this.windowed
      ? Math.max(1, Math.min(this.maxSeqLen - 1, Math.floor(this.ring / 4)))
      : this.maxSeqLen - 1; // the export's dynamic length allows at most capacity - 1
    for (const need of ["input_ids", "position_ids", "n_valid"]) {
      if (!session.inputNames.includes(need)) {
        throw new Error(`model.onnx has no input "${need}" (inputs: ${session.inputNames.join(", ")}); ` +
          "re-export the artifact with this edgellm's export/to_onnx.py");
      }
    }
    this.reset();
  }

  reset() {
    this.past = {};
    const arrays = { float32: Float32Array, float16: Uint16Array, int8: Int8Array };
    for (const n of this.pastNames) {
      const spec = this.cacheInputs[n] || { dtype: "float32", shape: this.cacheShape };
      const count = spec.shape.reduce((a, b) => a * b, 1);
      this.past[n] = new ort.Tensor(spec.dtype, new arrays[spec.dtype](count), spec.shape);
    }
    this.pos = 0;
  }

  /** Most tokens the next call takes; in a window also no more than the slots left before the ring
   * wraps (runtime.backend.Backend._chunk_len: every runtime chunks alike). */
  chunkLength() {
    if (!this.windowed) return this.maxChunk;
    const slot = this.pos < this.sinks ? this.pos : this.sinks + ((this.pos - this.sinks) % this.ring);
    return Math.min(this.maxChunk, this.sinks + this.ring - slot);
  }

  /** Append ids at the current position; returns the logits (Float32Array) of the last one. */
  async forward(ids) {
    if (!ids.length) throw new Error("forward needs at least one token id");
    if (!this.windowed && this.pos + ids.length > this.maxSeqLen) {
      throw new CacheOverflowError(`writing ${ids.length} token(s) at position ${this.pos} exceeds the KV cache ` +
        `capacity ${this.maxSeqLen}; shorten the prompt / max new tokens or re-export with a larger --max-seq-len`);
    }
    const vocab = this.manifest.vocab_size;
    for (const i of ids) {
      if (!(i >= 0 && i < vocab)) throw new Error(`token id ${i} is outside the model's vocabulary [0, ${vocab})`);
    }
    let last = null;
    for (let s = 0; s < ids.length; ) {
      const part = ids.slice(s, s + this.chunkLength());
      s += part.length;
      const T = part.length;
      const start = this.pos;
      const feeds = {
        input_ids: new ort.Tensor("int64", BigInt64Array.from(part, BigInt), [1, T]),
        position_ids: new ort.Tensor("int64", BigInt64Array.from({ length: T }, (_, k) => BigInt(start + k)), [T]),
        n_valid: new ort.Tensor("int64", BigInt64Array.of(BigInt(start + T)), []),
        ...this.past,
      };
      const out = await this.session.run(feeds);
      for (const n of this.pastNames) this.past[n] = out[n.replace(/^past_/, "present_")];
      const logits = out.logits;
      const V = logits.dims[logits.dims.length - 1];
      last = logits.data.slice((T - 1) * V, T * V);
      this.pos += T;
    }
    return last;
  }

  /**
   * Generate up to maxNewTokens after promptIds; calls onToken({id, text, index}) per token.
   * Returns {ids, text, promptTokens, prefillMs, decodeMs, prefillTokS, decodeTokS}.
   * Greedy by default; decode tok/s counts the decode calls (maxNewTokens - 1 of them).
   */
  async generate(promptIds, { maxNewTokens = 64, temperature = 0, topP = 1, seed = 0, stopAtEos = true, onToken } = {}) {
    this.reset();
    const random = rng(seed);
    const eos = new Set(this.manifest.eos_ids || this.tokenizer.eosIds);
    const dec = this.tokenizer.streamDecoder();
    const ids = [];
    let text = "";
    const t0 = performance.now();
    let logits = await this.forward(promptIds);
    const prefillMs = performance.now() - t0;
    let decodeMs = 0;
    let decodeSteps = 0;
    for (let i = 0; i < maxNewTokens; i++) {
      const id = sample(logits, { temperature, topP, random });
      ids.push(id);
      const piece = eos.has(id) ? "" : dec.push(id);
      text += piece;
      onToken?.({ id, text: piece, index: i, prefillMs, decodeMs, decodeSteps });
      if ((stopAtEos && eos.has(id)) || i + 1 >= maxNewTokens) break;
      const t = performance.now();
      logits = await this.forward([id]);
      decodeMs += performance.now() - t;
      decodeSteps++;
    }
    text += dec.flush();
    return {
      ids, text, promptTokens: promptIds.length, prefillMs, decodeMs, decodeSteps,
      prefillTokS: promptIds.length / (prefillMs / 1000),
      decodeTokS: decodeSteps ? decodeSteps / (decodeMs / 1000) : null,
    };
  }
}

/** Parse manifest.json; Python writes non-finite floats (e.g. mask_value -inf) as bare
 *  Infinity/NaN, which JSON.parse rejects: read them as null (the page never uses them). */
export function parseManifest(text) {
  return JSON.parse(text.replace(/([:\[,]\s*)(?:-?Infinity|NaN)(?=\s*[,\]}])/g, "$1null"));
}

export async function loadManifest(base) {
  return parseManifest(await (await fetchOk(new URL("manifest.json", base), "manifest.json")).text());
}

/**
 * Load an artifact directory URL (ending in "/"): manifest, tokenizer, model (sha256-checked
 * against the manifest when the page is a secure context), onnxruntime-web session.
 */
export async function loadArtifact(base, { threads = 0, onProgress = () => {} } = {}) {
  const [manifest, tokenizer] = await Promise.all([loadManifest(base), Tokenizer.fromUrl(base)]);
  if (manifest.format !== "edgellm-artifact") throw new Error(`${base}manifest.json is not an edgellm manifest`);
  if (manifest.target !== "onnx") {
    throw new Error(`this artifact targets ${manifest.target}; the web demo runs ONNX artifacts (export with --target onnx)`);
  }
  const files = manifest.files || {};
  const check = async (name, bytes) => {
    if (!globalThis.crypto?.subtle || !files[name]) return false;
    const got = await sha256Hex(bytes);
    if (got !== files[name]) throw new Error(`${name} does not match its sha256 in manifest.json (corrupt or modified); re-export`);
    return true;
  };
  const modelName = manifest.artifact;
  const model = await fetchBytes(new URL(modelName, base), modelName, (n, t) => onProgress(`downloading ${modelName}: ${(n / 1e6).toFixed(1)}${t ? ` / ${(t / 1e6).toFixed(1)}` : ""} MB`));
  const verified = await check(modelName, model);
  const externalData = [];
  const dataName = manifest.onnx?.external_data;
  if (dataName) {
    const data = await fetchBytes(new URL(dataName, base), dataName, (n, t) => onProgress(`downloading ${dataName}: ${(n / 1e6).toFixed(1)} MB`));
    await check(dataName, data);
    externalData.push({ path: dataName, data });
  }
  const isolated = globalThis.crossOriginIsolated === true;
  ort.env.wasm.numThreads = threads > 0 ? threads : (isolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
  onProgress(`creating session (wasm, ${ort.env.wasm.numThreads} thread(s)${isolated ? "" : ", not cross-origin isolated"})`);
  const t = performance.now();
  const session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"], graphOptimizationLevel: "all", externalData });
  const engine = new Engine(session, manifest, tokenizer);
  engine.loadInfo = { sessionMs: performance.now() - t, threads: ort.env.wasm.numThreads, crossOriginIsolated: isolated, sha256Verified: verified, modelBytes: model.length };
  return engine;
}
