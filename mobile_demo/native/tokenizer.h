// edgellm's tokenizer in C++: tiktoken-compatible byte-level BPE.
//
// Reads the two files every edgellm artifact carries (see runtime/tokenizer.py):
//   tokenizer.tiktoken   "base64(token bytes) rank" per line; rank = token id
//   tokenizer.meta.json  pat_str, special_tokens {text: id}, bos/eos ids, chat_template,
//                        optional always_special (matched even in plain text) and
//                        dropped_ids (byte placeholders the model lacks; removed after encoding)
// Encoding is tiktoken's: split at allowed special tokens, pre-tokenize each stretch with the
// pat_str regex (PCRE2, UTF + Unicode properties), then for every regex piece that is not a
// token by itself repeatedly merge the adjacent pair with the lowest rank.
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "json.h"

class Tokenizer {
 public:
  Json meta;
  std::vector<int> eos_ids;
  int bos_id = -1;

  explicit Tokenizer(const std::string& dir) {
    meta = Json::parse(read_file(dir + "/tokenizer.meta.json"));
    if (meta["format_version"].is_null() || meta["format_version"].as_int() != 1)
      throw std::runtime_error(dir + "/tokenizer.meta.json: unsupported format_version; re-export the artifact");
    load_ranks(dir + "/tokenizer.tiktoken");
    for (auto& [text, id] : meta["special_tokens"].obj) {
      specials_[text] = int(id.as_int());
      set_piece(int(id.as_int()), text);
    }
    for (auto& t : meta["always_special"].arr) always_special_.insert(t.as_string());
    for (auto& d : meta["dropped_ids"].arr) dropped_.insert(int(d.as_int()));
    for (auto& e : meta["eos_ids"].arr) eos_ids.push_back(int(e.as_int()));
    if (!meta["bos_id"].is_null()) bos_id = int(meta["bos_id"].as_int());
    compile(meta["pat_str"].as_string());
  }
  ~Tokenizer() {
    if (match_) pcre2_match_data_free(match_);
    if (re_) pcre2_code_free(re_);
  }
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Plain text: special-token text stays text (except always_special), as encode(text) in Python.
  std::vector<int> encode(const std::string& text) const { return encode_with(text, always_special_); }

  // Text in which every special token is recognized, as encode(text, allow_special=True).
  std::vector<int> encode_allow_special(const std::string& text) const {
    std::set<std::string> all;
    for (auto& kv : specials_) all.insert(kv.first);
    return encode_with(text, all);
  }

  // The chat prompt for one user message, rendered from the template (data, see
  // runtime/tokenizer.py render_chat): header + system turn + user turn + generation prompt.
  // Specials are recognized in the template's own text only; the user's text is plain text.
  std::vector<int> encode_chat(const Json& tpl, const std::string& user) const {
    if (tpl.kind != Json::Object)
      throw std::runtime_error("this artifact has no chat template; run without --chat");
    std::string before = str_or_empty(tpl["header"]);
    const Json& sys = tpl["default_system"];
    if (!sys.is_null()) {
      if (tpl["system"].is_null())
        throw std::runtime_error("the chat template has a default_system but no system turn");
      before += replace_content(tpl["system"].as_string(), sys.as_string());
    }
    std::string turn = tpl["user"].as_string();
    size_t at = turn.find("{content}");
    if (at == std::string::npos) throw std::runtime_error("the chat template's user turn has no {content}");
    before += turn.substr(0, at);
    std::string after = turn.substr(at + 9) + tpl["generation_prompt"].as_string();
    // Splice: specials are found in `before` and `after`; the user text joins the plain text
    // around it, so the regex sees the same stretches Python's tiktoken sees.
    std::vector<Segment> segs = split_specials(before, all_specials());
    append_plain(segs, user);
    for (auto& s : split_specials(after, all_specials())) {
      if (s.special >= 0) segs.push_back(s);
      else append_plain(segs, s.text);
    }
    return encode_segments(segs);
  }

  // The bytes of one token (a special token's text for special ids).
  const std::string& piece(int id) const {
    static const std::string empty;
    return (id >= 0 && id < (int)pieces_.size()) ? pieces_[id] : empty;
  }
  bool is_eos(int id) const { return std::find(eos_ids.begin(), eos_ids.end(), id) != eos_ids.end(); }

 private:
  struct Segment {
    std::string text;  // plain text to pre-tokenize and merge
    int special = -1;  // or a special token id
  };
  std::unordered_map<std::string, int> ranks_;
  std::vector<std::string> pieces_;
  std::unordered_map<std::string, int> specials_;
  std::set<std::string> always_special_;
  std::unordered_set<int> dropped_;
  pcre2_code* re_ = nullptr;
  pcre2_match_data* match_ = nullptr;

  static std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + path + "; is this an edgellm artifact directory?");
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  static std::string str_or_empty(const Json& j) { return j.is_null() ? std::string() : j.as_string(); }
  static std::string replace_content(std::string s, const std::string& content) {
    size_t at = s.find("{content}");
    return at == std::string::npos ? s : s.replace(at, 9, content);
  }
  std::set<std::string> all_specials() const {
    std::set<std::string> all;
    for (auto& kv : specials_) all.insert(kv.first);
    return all;
  }

  void set_piece(int id, const std::string& bytes) {
    if (id >= (int)pieces_.size()) pieces_.resize(id + 1);
    pieces_[id] = bytes;
  }

  static std::string base64_decode(const std::string& in) {
    static int table[256];
    static bool init = false;
    if (!init) {
      std::fill(table, table + 256, -1);
      const char* abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
      for (int i = 0; i < 64; i++) table[(unsigned char)abc[i]] = i;
      init = true;
    }
    std::string out;
    int val = 0, bits = -8;
    for (unsigned char c : in) {
      if (c == '=') break;
      if (table[c] < 0) throw std::runtime_error("bad base64");
      val = (val << 6) + table[c];
      bits += 6;
      if (bits >= 0) {
        out += char((val >> bits) & 0xFF);
        bits -= 8;
      }
    }
    return out;
  }

  void load_ranks(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + path + "; is this an edgellm artifact directory?");
    std::string line;
    int n = 0;
    while (std::getline(f, line)) {
      n++;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      size_t sp = line.find(' ');
      if (sp == std::string::npos) throw std::runtime_error(path + ":" + std::to_string(n) + " is not 'base64 rank'");
      std::string bytes = base64_decode(line.substr(0, sp));
      int rank = std::stoi(line.substr(sp + 1));
      ranks_[bytes] = rank;
      set_piece(rank, bytes);
    }
  }

  void compile(const std::string& pat) {
    int err;
    PCRE2_SIZE off;
    re_ = pcre2_compile((PCRE2_SPTR)pat.c_str(), pat.size(), PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!re_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw std::runtime_error("tokenizer pat_str does not compile with PCRE2 at offset " +
                               std::to_string(off) + ": " + (const char*)msg);
    }
    pcre2_jit_compile(re_, PCRE2_JIT_COMPLETE);  // optional speed-up; the interpreter is the fallback
    match_ = pcre2_match_data_create_from_pattern(re_, nullptr);
  }

  // Leftmost occurrence of any allowed special (longest on a tie) splits the text.
  std::vector<Segment> split_specials(const std::string& text, const std::set<std::string>& allowed) const {
    std::vector<Segment> out;
    size_t start = 0;
    while (start <= text.size()) {
      size_t best = std::string::npos, best_len = 0;
      for (auto& s : allowed) {
        size_t at = text.find(s, start);
        if (at != std::string::npos && (at < best || (at == best && s.size() > best_len))) best = at, best_len = s.size();
      }
      size_t end = best == std::string::npos ? text.size() : best;
      if (end > start) out.push_back({text.substr(start, end - start), -1});
      if (best == std::string::npos) break;
      out.push_back({"", specials_.at(text.substr(best, best_len))});
      start = best + best_len;
    }
    return out;
  }
  static void append_plain(std::vector<Segment>& segs, const std::string& text) {
    if (!segs.empty() && segs.back().special < 0) segs.back().text += text;
    else segs.push_back({text, -1});
  }

  std::vector<int> encode_with(const std::string& text, const std::set<std::string>& allowed) const {
    return encode_segments(split_specials(text, allowed));
  }

  // Plain stretches still honour always_special (a no-op when they were split on all specials).
  std::vector<int> encode_segments(const std::vector<Segment>& segs) const {
    std::vector<int> ids;
    for (auto& seg : segs) {
      if (seg.special >= 0) {
        ids.push_back(seg.special);
        continue;
      }
      for (auto& s : split_specials(seg.text, always_special_))
        s.special >= 0 ? ids.push_back(s.special) : encode_ordinary(s.text, ids);
    }
    if (!dropped_.empty())
      ids.erase(std::remove_if(ids.begin(), ids.end(), [&](int i) { return dropped_.count(i) > 0; }), ids.end());
    return ids;
  }

  // Regex pre-tokenization, then BPE on every piece.
  void encode_ordinary(const std::string& text, std::vector<int>& ids) const {
    PCRE2_SIZE pos = 0;
    while (pos < text.size()) {
      int rc = pcre2_match(re_, (PCRE2_SPTR)text.data(), text.size(), pos, 0, match_, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        throw std::runtime_error(std::string("cannot tokenize the text (") + (const char*)msg + "); is it valid UTF-8?");
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match_);
      if (ov[1] == ov[0]) {  // empty match: step over one UTF-8 character
        pos = ov[0] + 1;
        while (pos < text.size() && (text[pos] & 0xC0) == 0x80) pos++;
        continue;
      }
      bpe(text.substr(ov[0], ov[1] - ov[0]), ids);
      pos = ov[1];
    }
  }

  int rank_of(const std::string& piece, size_t a, size_t b) const {
    auto it = ranks_.find(piece.substr(a, b - a));
    return it == ranks_.end() ? INT_MAX : it->second;
  }

  // tiktoken's byte_pair_merge: parts[i] = (start byte, rank of the pair starting there).
  void bpe(const std::string& piece, std::vector<int>& ids) const {
    auto whole = ranks_.find(piece);
    if (whole != ranks_.end()) return ids.push_back(whole->second);
    std::vector<std::pair<size_t, int>> parts;
    for (size_t i = 0; i + 1 < piece.size(); i++) parts.push_back({i, rank_of(piece, i, i + 2)});
    parts.push_back({piece.size() - 1, INT_MAX});
    parts.push_back({piece.size(), INT_MAX});
    auto pair_rank = [&](size_t i) {
      return i + 3 < parts.size() ? rank_of(piece, parts[i].first, parts[i + 3].first) : INT_MAX;
    };
    while (true) {
      size_t best = 0;
      int min_rank = INT_MAX;
      for (size_t i = 0; i + 1 < parts.size(); i++)
        if (parts[i].second < min_rank) min_rank = parts[i].second, best = i;
      if (min_rank == INT_MAX) break;
      if (best > 0) parts[best - 1].second = pair_rank(best - 1);
      parts[best].second = pair_rank(best);
      parts.erase(parts.begin() + best + 1);
    }
    for (size_t i = 0; i + 1 < parts.size(); i++) {
      int r = rank_of(piece, parts[i].first, parts[i + 1].first);
      if (r == INT_MAX) throw std::runtime_error("byte sequence has no token; the rank file is incomplete");
      ids.push_back(r);
    }
  }
};

// Turns token bytes into printable UTF-8 as they arrive, holding back a character split
// across tokens; invalid bytes become U+FFFD (as Python's decode(errors="replace")).
class Utf8Stream {
 public:
  std::string push(const std::string& bytes) {
    pending_ += bytes;
    return drain(false);
  }
  std::string flush() { return drain(true); }

 private:
  std::string pending_;
  std::string drain(bool final) {
    std::string out;
    size_t i = 0;
    while (i < pending_.size()) {
      unsigned char c = pending_[i];
      size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
      if (len == 0) {
        out += "\xEF\xBF\xBD";
        i++;
        continue;
      }
      size_t have = 1;
      while (have < len && i + have < pending_.size() && (pending_[i + have] & 0xC0) == 0x80) have++;
      if (have == len) {
        out.append(pending_, i, len);
        i += len;
      } else if (i + have == pending_.size() && !final) {
        break;  // incomplete character at the end: wait for the next token
      } else {
        out += "\xEF\xBF\xBD";
        i += have;
      }
    }
    pending_.erase(0, i);
    return out;
  }
};
