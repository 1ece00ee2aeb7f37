// The artifact's tokenizer (tokenizer.tiktoken + tokenizer.meta.json) in JavaScript.
//
// BPE runs in js-tiktoken; this module only adapts edgellm's two files to it: the rank file
// becomes js-tiktoken's rank text, the pre-tokenizer pattern is rewritten so a JS /u regex
// splits exactly as tiktoken's Rust regex does (see toJsPattern), and encode() applies the
// same rules as runtime/tokenizer.py (specials are plain text unless allowed, always_special
// tokens are always matched, dropped_ids are removed). Works in browsers and in Node.
import { Tiktoken } from "js-tiktoken/lite";

// Rust regex's Perl classes are Unicode-aware; JS's \d and \w are ASCII-only and JS's \s
// differs from Unicode White_Space (it adds U+FEFF and lacks U+0085). Spell them as properties.
const PERL_CLASSES = {
  s: ["\\p{White_Space}", "\\P{White_Space}"],
  d: ["\\p{Nd}", "\\P{Nd}"],
  w: ["\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}", null],
};

/**
 * Rewrite a tiktoken (Rust fancy-regex) pattern as an equivalent JavaScript /u pattern.
 * Handles: Unicode \s \d \w (\S \D too), inline case-insensitive groups "(?i:...)" (ASCII
 * letters become [xX] classes) and possessive quantifiers (X++ etc. become the atomic
 * (?=(X+))\N idiom). Anything else is passed through and must already be valid JS.
 */
export function toJsPattern(pat) {
  let out = "";
  let inClass = false;
  let groups = 0; // capture groups so far (for the backreferences we add)
  const atomStarts = []; // out-index where the last atom began
  const groupStack = []; // {start, ci}
  let ci = 0; // depth of (?i: groups we are inside
  let lastAtom = -1;
  for (let i = 0; i < pat.length; i++) {
    const c = pat[i];
    if (c === "\\") {
      const n = pat[i + 1];
      let esc = pat.slice(i, i + 2);
      let skip = 1;
      if ((n === "p" || n === "P") && pat[i + 2] === "{") {
        const end = pat.indexOf("}", i);
        esc = pat.slice(i, end + 1);
        skip = end - i;
      } else if (n === "x" && pat[i + 2] === "{") {
        const end = pat.indexOf("}", i);
        esc = "\\u{" + pat.slice(i + 3, end) + "}";
        skip = end - i;
      } else if (PERL_CLASSES[n.toLowerCase()]) {
        const [pos, neg] = PERL_CLASSES[n.toLowerCase()];
        const isNeg = n !== n.toLowerCase();
        if (isNeg && !neg) throw new Error(`pattern uses \\${n}, which has no JS equivalent here`);
        esc = isNeg ? neg : pos;
        if (n === "w" && !inClass) esc = `[${esc}]`;
      }
      if (!inClass) lastAtom = out.length;
      out += esc;
      i += skip;
      continue;
    }
    if (inClass) {
      if (c === "]") inClass = false;
      if (ci > 0 && /[a-zA-Z]/.test(c)) {
        if (pat[i - 1] === "-" || pat[i + 1] === "-") throw new Error("pattern has a letter range inside (?i:...); spell both cases");
        out += c.toLowerCase() + c.toUpperCase();
        continue;
      }
      out += c;
      continue;
    }
    if (c === "[") {
      inClass = true;
      lastAtom = out.length;
      out += c;
      if (pat[i + 1] === "^") { out += "^"; i++; }
      if (pat[i + 1] === "]") { out += "\\]"; i++; }
      continue;
    }
    if (c === "(") {
      if (pat.startsWith("(?i:", i)) {
        groupStack.push({ start: out.length, ci: true });
        ci++;
        out += "(?:";
        i += 3;
        continue;
      }
      if (pat[i + 1] !== "?") groups++;
      else if (pat.startsWith("(?<", i) && pat[i + 3] !== "=" && pat[i + 3] !== "!") groups++;
      else if (/^\(\?[a-zA-Z-]+[:)]/.test(pat.slice(i))) {
        throw new Error(`pattern uses an inline flag group ${pat.slice(i, i + 6)}...; only (?i: is supported`);
      }
      groupStack.push({ start: out.length, ci: false });
      out += c;
      continue;
    }
    if (c === ")") {
      const g = groupStack.pop();
      if (g && g.ci) ci--;
      lastAtom = g ? g.start : -1;
      out += c;
      continue;
    }
    const quant = c === "*" || c === "+" || c === "?" || c === "}";
    if (quant && pat[i + 1] === "+" && lastAtom >= 0) {
      // possessive: atom + quantifier, then "+"  ->  (?=(atom quantifier))\N
      const atom = out.slice(lastAtom) + c;
      groups++;
      out = out.slice(0, lastAtom) + `(?=(${atom}))\\${groups}`;
      i++;
      lastAtom = -1;
      continue;
    }
    if (c === "{") {  // counted quantifier: copy through to "}"
      const end = pat.indexOf("}", i);
      if (end > 0 && /^\{\d+(,\d*)?\}$/.test(pat.slice(i, end + 1))) {
        if (pat[end + 1] === "+" && lastAtom >= 0) {
          const atom = out.slice(lastAtom) + pat.slice(i, end + 1);
          groups++;
          out = out.slice(0, lastAtom) + `(?=(${atom}))\\${groups}`;
          i = end + 1;
          lastAtom = -1;
          continue;
        }
        out += pat.slice(i, end + 1);
        i = end;
        continue;
      }
    }
    if (ci > 0 && /[a-zA-Z]/.test(c)) {
      lastAtom = out.length;
      out += `[${c.toLowerCase()}${c.toUpperCase()}]`;
      continue;
    }
    if (!quant && c !== "|") lastAtom = out.length;
    out += c;
  }
  new RegExp(out, "gu"); // throws a SyntaxError naming the problem if still not valid JS
  return out;
}

/** edgellm's rank file ("base64 rank" per line) as js-tiktoken's rank text ("! rank base64"). */
function toJsRanks(tiktokenText) {
  const lines = [];
  for (const line of tiktokenText.split("\n")) {
    const t = line.trim();
    if (!t) continue;
    const [b64, rank] = t.split(/\s+/);
    if (!/^\d+$/.test(rank || "")) throw new Error(`tokenizer.tiktoken: bad line "${t.slice(0, 40)}"; the rank file is corrupt`);
    lines.push(`! ${rank} ${b64}`);
  }
  return lines.join("\n");
}

/** Render a data chat template (same rules as runtime/tokenizer.py render_chat). */
export function renderChat(template, messages, addGenerationPrompt = true) {
  const out = [template.header || ""];
  const system = messages.find((m) => m.role === "system");
  const sys = system ? system.content : template.default_system;
  if (sys != null) {
    if (!template.system) throw new Error("this chat template has no system turn; drop the system message");
    out.push(template.system.replace("{content}", sys));
  }
  for (const m of messages) {
    if (m.role === "system") continue;
    if (m.role !== "user" && m.role !== "assistant") throw new Error(`unknown chat role ${m.role}; use system, user or assistant`);
    out.push(template[m.role].replace("{content}", m.content));
  }
  if (addGenerationPrompt) out.push(template.generation_prompt);
  return out.join("");
}

export class Tokenizer {
  /** @param {string} ranksText contents of tokenizer.tiktoken  @param {object} meta tokenizer.meta.json */
  constructor(ranksText, meta) {
    if (meta.format_version !== 1) {
      throw new Error(`tokenizer.meta.json has format_version ${meta.format_version}; this demo reads 1 (re-export the artifact)`);
    }
    this.meta = meta;
    this.patStr = toJsPattern(meta.pat_str);
    this.specialTokens = meta.special_tokens || {};
    this.alwaysSpecial = meta.always_special || [];
    this.dropped = new Set(meta.dropped_ids || []);
    this.eosIds = meta.eos_ids || [];
    this.bosId = meta.bos_id;
    this.chatTemplate = meta.chat_template;
    this.enc = new Tiktoken({ pat_str: this.patStr, special_tokens: this.specialTokens, bpe_ranks: toJsRanks(ranksText) });
  }

  static async fromUrl(base) {
    const get = async (name) => {
      const r = await fetch(new URL(name, base));
      if (!r.ok) throw new Error(`${name}: HTTP ${r.status} at ${new URL(name, base)}; is this an edgellm artifact directory?`);
      return r;
    };
    const [ranks, meta] = await Promise.all([get("tokenizer.tiktoken").then((r) => r.text()), get("tokenizer.meta.json").then((r) => r.json())]);
    return new Tokenizer(ranks, meta);
  }

  /** Same ids as runtime.tokenizer.Tokenizer.encode(text, allow_special). */
  encode(text, allowSpecial = false) {
    const allowed = allowSpecial ? "all" : this.alwaysSpecial;
    let ids = this.enc.encode(text, allowed, []);
    if (this.dropped.size) ids = ids.filter((i) => !this.dropped.has(i));
    return ids;
  }

  /** Raw bytes of one token (special tokens: their UTF-8 text). */
  piece(id) {
    const b = this.enc.textMap.get(id) ?? this.enc.inverseSpecialTokens[id];
    if (b == null) throw new Error(`token id ${id} is not in this tokenizer; the ids come from a different model`);
    return b;
  }

  decode(ids) {
    const dec = this.streamDecoder();
    return ids.map((i) => dec.push(i)).join("") + dec.flush();
  }

  /** Incremental UTF-8: holds back a character split across tokens, like runtime's StreamDecoder. */
  streamDecoder() {
    const td = new TextDecoder("utf-8");
    return { push: (id) => td.decode(this.piece(id), { stream: true }), flush: () => td.decode() };
  }

  applyChatTemplate(messages) {
    if (!this.chatTemplate) throw new Error("this tokenizer has no chat template; use raw prompt mode");
    return renderChat(this.chatTemplate, messages);
  }
}
