// edgellm_run: generate text with an edgellm ExecuTorch artifact, in plain C++17.
//
// Read top to bottom: options, the artifact (manifest + tokenizer + .pte), the model call,
// the sampler, the generation loop. The artifact directory is what `python -m export
// executorch --flavour portable` writes:
//   manifest.json         target, max_seq_len, eos_ids, chat_template, "artifact": "model.pte"
//   model.pte             method forward(tokens int64[1,T], input_pos int64[T]) -> logits
//                         float32[1,T,V]; the KV cache lives inside the program and persists
//   tokenizer.tiktoken + tokenizer.meta.json   (see tokenizer.h)
// Only ExecuTorch's stock runtime, CPU kernels, quantized kernels and XNNPACK are needed, so
// the same file builds for Android/iOS against ExecuTorch's prebuilt libraries.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "json.h"
#include "tokenizer.h"

// The wheel ships the thread pool library but not its header: declare the two calls we use.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

// ExecuTorch logs informational lines (CPU probing, ...) to stderr; keep only errors.
static void log_errors_only(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line,
                            const char* msg, size_t len) {
  if (level == kError || level == kFatal) std::fprintf(stderr, "executorch: %s:%zu: %.*s\n", file, line, int(len), msg);
}

using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::EValue;

// ---- options ----

struct Options {
  std::string artifact, prompt;
  bool chat = false, print_ids = false, tokenize_only = false, ignore_eos = false;
  int max_new_tokens = 128, threads = 0;
  float temperature = 0.0f, top_p = 1.0f;  // temperature 0 = greedy
  unsigned long long seed = 0;
};

[[noreturn]] static void fail(const std::string& msg) {
  std::fprintf(stderr, "edgellm_run: error: %s\n", msg.c_str());
  std::exit(1);
}

static const char* USAGE =
    "usage: edgellm_run --artifact DIR --prompt TEXT [--chat] [--max-new-tokens N]\n"
    "                   [--temperature T] [--top-p P] [--seed S] [--threads N]\n"
    "                   [--print-ids] [--tokenize-only] [--ignore-eos]\n"
    "  --chat           wrap the prompt in the artifact's chat template (default: raw text)\n"
    "  --temperature    0 = greedy (default); --top-p nucleus sampling; --seed for sampling\n"
    "  --threads        XNNPACK thread pool size (default: ExecuTorch's choice)\n"
    "  --print-ids      print the generated token ids on one line instead of the text\n"
    "  --tokenize-only  print the prompt's token ids and exit (no model is loaded)\n"
    "  --ignore-eos     keep generating after an end-of-sequence token (for benchmarks)\n";

static Options parse_args(int argc, char** argv) {
  Options o;
  bool have_prompt = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(a + " needs a value; see --help");
      return argv[++i];
    };
    auto number = [&](const std::string& v) -> double {
      char* end = nullptr;
      double d = std::strtod(v.c_str(), &end);
      if (v.empty() || *end) fail(a + " expects a number, got '" + v + "'");
      return d;
    };
    if (a == "--artifact") o.artifact = value();
    else if (a == "--prompt") o.prompt = value(), have_prompt = true;
    else if (a == "--chat") o.chat = true;
    else if (a == "--raw") o.chat = false;
    else if (a == "--max-new-tokens") o.max_new_tokens = int(number(value()));
    else if (a == "--temperature") o.temperature = float(number(value()));
    else if (a == "--top-p") o.top_p = float(number(value()));
    else if (a == "--seed") o.seed = (unsigned long long)number(value());
    else if (a == "--threads") o.threads = int(number(value()));
    else if (a == "--print-ids") o.print_ids = true;
    else if (a == "--tokenize-only") o.tokenize_only = true;
    else if (a == "--ignore-eos") o.ignore_eos = true;
    else if (a == "--help" || a == "-h") std::fputs(USAGE, stdout), std::exit(0);
    else fail("unknown option " + a + "; see --help");
  }
  if (o.artifact.empty()) fail("--artifact DIR is required (an ExecuTorch artifact directory)");
  if (!have_prompt) fail("--prompt TEXT is required");
  if (o.max_new_tokens < 1) fail("--max-new-tokens must be at least 1");
  if (o.temperature < 0) fail("--temperature must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) fail("--top-p must be in (0, 1]");
  if (o.threads < 0) fail("--threads must be >= 0");
  return o;
}

// ---- the artifact ----

static Json read_manifest(const std::string& dir) {
  std::ifstream f(dir + "/manifest.json", std::ios::binary);
  if (!f) fail("no manifest.json in '" + dir + "'; pass an artifact directory written by `python -m export executorch`");
  std::stringstream ss;
  ss << f.rdbuf();
  Json m;
  try {
    m = Json::parse(ss.str());
  } catch (const std::exception& e) {
    fail(dir + "/manifest.json is not valid JSON (" + e.what() + "); re-export the artifact");
  }
  std::string target = m["target"].kind == Json::String ? m["target"].str : "?";
  if (target != "executorch")
    fail("'" + dir + "' is a " + target + " artifact; edgellm_run needs an ExecuTorch one (export with target executorch)");
  const Json& et = m["executorch"];
  bool custom = et["custom_ops"].kind == Json::Bool && et["custom_ops"].b;
  if (custom || m["flavour"].str == "fast" || et["flavour"].str == "fast")
    fail("'" + dir + "' is the 'fast' ExecuTorch flavour, whose llama:: custom ops the stock runtime lacks; "
         "re-export with --flavour portable");
  if (m["max_seq_len"].kind != Json::Number || m["artifact"].kind != Json::String)
    fail(dir + "/manifest.json lacks max_seq_len or artifact; re-export the artifact");
  return m;
}

// ---- the model: one call per chunk of tokens, returns the last position's logits ----

struct Model {
  Module module;
  std::string method;
  std::vector<float> logits;  // [vocab] of the last position

  Model(const std::string& pte, std::string method_name)
      : module(pte, Module::LoadMode::MmapUseMlockIgnoreErrors), method(std::move(method_name)) {
    auto err = module.load_method(method);
    if (err != executorch::runtime::Error::Ok)
      fail("cannot load method '" + method + "' from " + pte + " (ExecuTorch error " +
           executorch::runtime::to_string(err) + "); is it a portable edgellm .pte for this ExecuTorch version?");
  }

  const std::vector<float>& forward(std::vector<int64_t> tokens, int64_t start) {
    auto T = (executorch::aten::SizesType)tokens.size();
    std::vector<int64_t> pos(tokens.size());
    std::iota(pos.begin(), pos.end(), start);
    auto tok_t = from_blob(tokens.data(), {1, T}, executorch::aten::ScalarType::Long);
    auto pos_t = from_blob(pos.data(), {T}, executorch::aten::ScalarType::Long);
    auto out = module.execute(method, {EValue(tok_t), EValue(pos_t)});
    if (!out.ok())
      fail(std::string("the model call failed (ExecuTorch error ") + executorch::runtime::to_string(out.error()) + ")");
    const auto& t = out.get()[0].toTensor();
    size_t V = t.size(t.dim() - 1);
    const float* last = t.const_data_ptr<float>() + (t.numel() - V);
    logits.assign(last, last + V);
    return logits;
  }
};

// ---- the sampler: greedy, or temperature + top-p from a seeded generator ----

static int sample(const std::vector<float>& logits, const Options& o, std::mt19937_64& rng) {
  int V = (int)logits.size();
  if (o.temperature == 0) return int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  float mx = *std::max_element(logits.begin(), logits.end());
  std::vector<std::pair<double, int>> probs(V);
  double sum = 0;
  for (int i = 0; i < V; i++) sum += (probs[i] = {std::exp((logits[i] - mx) / o.temperature), i}).first;
  std::sort(probs.begin(), probs.end(), [](auto& a, auto& b) { return a.first > b.first; });
  double kept = 0;
  size_t n = 0;
  while (n < probs.size() && (n == 0 || kept < o.top_p * sum)) kept += probs[n++].first;
  double r = std::uniform_real_distribution<double>(0, kept)(rng);
  for (size_t i = 0; i < n; i++)
    if ((r -= probs[i].first) <= 0) return probs[i].second;
  return probs[n - 1].second;
}

static double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

static void print_ids(const std::vector<int>& ids) {
  for (size_t i = 0; i < ids.size(); i++) std::printf(i ? " %d" : "%d", ids[i]);
  std::printf("\n");
}

// ---- the loop ----

int main(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(log_errors_only, __FILE__));
  std::string dir = o.artifact;

  // Tokenize first: --tokenize-only needs nothing but the tokenizer files.
  Json manifest = o.tokenize_only ? Json() : read_manifest(dir);
  std::vector<int> ids;
  try {
    Tokenizer tok(dir);
    const Json& tpl = manifest.has("chat_template") ? manifest["chat_template"] : tok.meta["chat_template"];
    ids = o.chat ? tok.encode_chat(tpl, o.prompt) : tok.encode(o.prompt);
    if (o.tokenize_only) return print_ids(ids), 0;

    // Capacity: every fed token needs a cache slot; the last generated token is never fed. A
    // windowed cache (kv_cache.window) has no end: its ring keeps the recent positions.
    int max_seq_len = int(manifest["max_seq_len"].as_int());
    bool windowed = manifest["kv_cache"]["window"].kind == Json::Number;
    if (ids.empty()) fail("the prompt is empty: give at least one token");
    if (!windowed && (int)ids.size() + o.max_new_tokens - 1 > max_seq_len)
      fail("prompt (" + std::to_string(ids.size()) + " tokens) + --max-new-tokens (" + std::to_string(o.max_new_tokens) +
           ") exceeds the KV cache capacity " + std::to_string(max_seq_len) +
           "; shorten the prompt, lower --max-new-tokens, or re-export with a larger --max-seq-len");
    std::vector<int> eos;
    for (auto& e : manifest["eos_ids"].arr) eos.push_back(int(e.as_int()));
    if (eos.empty()) eos = tok.eos_ids;
    // The .pte's dynamic query length tops out below the capacity (a window's: a quarter of its
    // ring, ModelConfig.max_chunk): prefill in chunks that fit.
    int max_chunk = max_seq_len - 1;
    const Json& dyn = manifest["executorch"]["dynamic_tokens"];
    if (dyn.kind == Json::Array && dyn.arr.size() == 2) max_chunk = int(dyn.arr[1].as_int());

    if (o.threads > 0) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(o.threads);
    const Json& et = manifest["executorch"];
    std::string method = et["method"].kind == Json::String ? et["method"].str : "forward";
    Model model(dir + "/" + manifest["artifact"].as_string(), method);

    if (!o.print_ids && !o.chat) std::fputs(o.prompt.c_str(), stdout), std::fflush(stdout);
    auto t0 = std::chrono::steady_clock::now();
    const std::vector<float>* logits = nullptr;
    // In a window a chunk also ends where the ring wraps (runtime.backend.Backend._chunk_len:
    // every runtime chunks alike, since the chunking decides what a query sees).
    int sinks = windowed && manifest["kv_cache"]["sinks"].kind == Json::Number ? int(manifest["kv_cache"]["sinks"].as_int()) : 0;
    int ring = windowed ? int(manifest["kv_cache"]["window"].as_int()) - sinks : 0;
    for (size_t s = 0; s < ids.size();) {
      size_t n = max_chunk;
      if (windowed) {
        size_t slot = (int)s < sinks ? s : sinks + (s - sinks) % ring;
        n = std::min(n, sinks + ring - slot);
      }
      size_t e = std::min(ids.size(), s + n);
      logits = &model.forward(std::vector<int64_t>(ids.begin() + s, ids.begin() + e), (int64_t)s);
      s = e;
    }
    double prefill_s = seconds_since(t0);

    std::mt19937_64 rng(o.seed);
    Utf8Stream stream;
    std::vector<int> out;
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < o.max_new_tokens; i++) {
      int next = sample(*logits, o, rng);
      out.push_back(next);
      if (!o.ignore_eos && std::find(eos.begin(), eos.end(), next) != eos.end()) break;
      if (!o.print_ids) std::fputs(stream.push(tok.piece(next)).c_str(), stdout), std::fflush(stdout);
      if (i + 1 < o.max_new_tokens) logits = &model.forward({next}, (int64_t)(ids.size() + i));
    }
    double decode_s = seconds_since(t1);
    if (o.print_ids) print_ids(out);
    else std::printf("%s\n", stream.flush().c_str());

    int n_dec = (int)out.size() - 1;  // the first token comes from the prefill logits
    std::fprintf(stderr, "prompt %zu tok at %.1f tok/s, decode %d tok at %.1f tok/s (%s)\n", ids.size(),
                 ids.size() / prefill_s, n_dec, n_dec > 0 ? n_dec / decode_s : 0.0,
                 o.threads > 0 ? (std::to_string(o.threads) + " threads").c_str() : "default threads");
  } catch (const std::exception& e) {
    fail(e.what());
  }
  return 0;
}
