// Just enough JSON to read an artifact's manifest.json and tokenizer.meta.json.
// Objects, arrays, strings (with \uXXXX escapes and surrogate pairs), numbers, true/false/null.
#pragma once

#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;

  bool is_null() const { return kind == Null; }
  // obj["key"], or a null value when the key is absent (or this is not an object).
  const Json& operator[](const std::string& key) const {
    static const Json null_value;
    auto it = obj.find(key);
    return (kind == Object && it != obj.end()) ? it->second : null_value;
  }
  bool has(const std::string& key) const { return kind == Object && obj.count(key); }
  long long as_int() const {
    if (kind != Number) throw std::runtime_error("expected a number");
    return (long long)num;
  }
  const std::string& as_string() const {
    if (kind != String) throw std::runtime_error("expected a string");
    return str;
  }

  static Json parse(const std::string& text) {
    size_t i = 0;
    Json v = parse_value(text, i);
    skip_ws(text, i);
    if (i != text.size()) throw std::runtime_error("trailing characters after the JSON value");
    return v;
  }

 private:
  static void skip_ws(const std::string& s, size_t& i) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++;
  }
  static void expect(const std::string& s, size_t& i, const char* word) {
    for (const char* p = word; *p; p++, i++)
      if (i >= s.size() || s[i] != *p) throw std::runtime_error(std::string("expected ") + word);
  }
  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  static unsigned hex4(const std::string& s, size_t& i) {
    if (i + 4 > s.size()) throw std::runtime_error("bad \\u escape");
    unsigned v = std::stoul(s.substr(i, 4), nullptr, 16);
    i += 4;
    return v;
  }
  static std::string parse_string(const std::string& s, size_t& i) {
    std::string out;
    i++;  // opening quote
    while (true) {
      if (i >= s.size()) throw std::runtime_error("unterminated string");
      char c = s[i++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      char e = s[i++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          unsigned cp = hex4(s, i);
          if (cp >= 0xD800 && cp < 0xDC00 && i + 1 < s.size() && s[i] == '\\' && s[i + 1] == 'u') {
            i += 2;
            unsigned lo = hex4(s, i);
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: out += e;  // \" \\ \/
      }
    }
  }
  static Json parse_value(const std::string& s, size_t& i) {
    skip_ws(s, i);
    if (i >= s.size()) throw std::runtime_error("unexpected end of JSON");
    Json v;
    char c = s[i];
    if (c == '{') {
      v.kind = Object;
      i++;
      skip_ws(s, i);
      if (s[i] == '}') return i++, v;
      while (true) {
        skip_ws(s, i);
        if (s[i] != '"') throw std::runtime_error("expected a key");
        std::string key = parse_string(s, i);
        skip_ws(s, i);
        expect(s, i, ":");
        v.obj[key] = parse_value(s, i);
        skip_ws(s, i);
        if (s[i] == ',') { i++; continue; }
        expect(s, i, "}");
        return v;
      }
    }
    if (c == '[') {
      v.kind = Array;
      i++;
      skip_ws(s, i);
      if (s[i] == ']') return i++, v;
      while (true) {
        v.arr.push_back(parse_value(s, i));
        skip_ws(s, i);
        if (s[i] == ',') { i++; continue; }
        expect(s, i, "]");
        return v;
      }
    }
    if (c == '"') {
      v.kind = String;
      v.str = parse_string(s, i);
      return v;
    }
    if (c == 't') return expect(s, i, "true"), v.kind = Bool, v.b = true, v;
    if (c == 'f') return expect(s, i, "false"), v.kind = Bool, v;
    if (c == 'n') return expect(s, i, "null"), v;
    char* end = nullptr;
    v.num = std::strtod(s.c_str() + i, &end);
    if (end == s.c_str() + i) throw std::runtime_error("unexpected character in JSON");
    v.kind = Number;
    i = end - s.c_str();
    return v;
  }
};
