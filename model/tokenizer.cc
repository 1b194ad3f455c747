#include "model/tokenizer.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <queue>
#include <stdexcept>

namespace mprefill {

std::string tokenizer_beside(const std::string& model_path) {
  namespace fs = std::filesystem;
  if (model_path.empty() || model_path.rfind("random:", 0) == 0) return "";
  std::error_code ec;
  const fs::path p(model_path);
  const fs::path dir = fs::is_directory(p, ec) ? p : p.parent_path();
  const fs::path tok = (dir.empty() ? fs::path(".") : dir) / "tokenizer.bin";
  return fs::is_regular_file(tok, ec) ? tok.string() : "";
}

namespace {

constexpr int kFirstByteToken = 3;
constexpr float kMinMergeScore = -1e10f;  // run.c's initial best score: lower never merges

[[noreturn]] void fail(const std::string& path, const std::string& msg) {
  throw std::runtime_error("tokenizer '" + path + "': " + msg);
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// Byte b if piece is "<0xHH>" (HH = b), the byte itself, or the UTF-8 form of U+00bb.
int byte_piece_value(const std::string& p) {
  if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>') {
    const int hi = hex_digit(p[3]), lo = hex_digit(p[4]);
    if (hi >= 0 && lo >= 0) return hi * 16 + lo;
  }
  return -1;
}
bool is_latin1_form(const std::string& p, int b) {
  if (b < 0x80) return p.size() == 1 && static_cast<unsigned char>(p[0]) == b;
  return p.size() == 2 && static_cast<unsigned char>(p[0]) == (0xC0 | (b >> 6)) &&
         static_cast<unsigned char>(p[1]) == (0x80 | (b & 0x3F));
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path, int expected_vocab) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail(path, "is a directory, not a tokenizer.bin");
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, std::string("cannot open: ") + std::strerror(errno));
  const std::string buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) fail(path, "read error");
  size_t off = 0;
  auto read_bytes = [&](void* dst, size_t n, const char* what, size_t token) {
    if (buf.size() - off < n)
      fail(path, "truncated: " + std::string(what) + " of token " + std::to_string(token) +
                     " needs bytes [" + std::to_string(off) + ", " + std::to_string(off + n) +
                     ") of a " + std::to_string(buf.size()) + "-byte file");
    std::memcpy(dst, buf.data() + off, n);
    off += n;
  };

  Tokenizer t;
  int32_t max_len = 0;
  if (buf.size() < 4) fail(path, "truncated: " + std::to_string(buf.size()) + " bytes, no header");
  read_bytes(&max_len, 4, "header", 0);
  if (max_len <= 0 || max_len > (1 << 16))
    fail(path, "corrupt header: max_token_length=" + std::to_string(max_len));
  t.max_token_length_ = max_len;
  while (off < buf.size()) {
    const size_t id = t.pieces_.size();
    float score;
    int32_t len;
    read_bytes(&score, 4, "score", id);
    read_bytes(&len, 4, "length", id);
    if (len < 0 || len > max_len)
      fail(path, "corrupt: token " + std::to_string(id) + " has length " + std::to_string(len) +
                     " (max_token_length " + std::to_string(max_len) + ")");
    std::string s(static_cast<size_t>(len), '\0');
    read_bytes(s.data(), static_cast<size_t>(len), "text", id);
    t.pieces_.push_back(std::move(s));
    t.scores_.push_back(score);
  }
  const int n = t.vocab_size();
  if (n < 3) fail(path, "has " + std::to_string(n) + " tokens; at least <unk>, BOS, EOS needed");
  if (expected_vocab > 0 && n != expected_vocab)
    fail(path, "has " + std::to_string(n) + " tokens but the model's vocab_size is " +
                   std::to_string(expected_vocab));

  t.byte_of_.assign(n, -1);
  for (int id = 0; id < n; ++id) {
    const int b = byte_piece_value(t.pieces_[id]);
    if (b >= 0) t.byte_of_[id] = b;
  }
  t.byte_fallback_ = n >= kFirstByteToken + 256;
  for (int b = 0; b < 256 && t.byte_fallback_; ++b) {
    const int id = kFirstByteToken + b;
    if (t.byte_of_[id] != b && !is_latin1_form(t.pieces_[id], b)) t.byte_fallback_ = false;
  }
  if (t.byte_fallback_)
    for (int b = 0; b < 256; ++b) t.byte_of_[kFirstByteToken + b] = b;
  // Text lookup: first id of each piece, skipping control and byte tokens.
  for (int id = kFirstByteToken; id < n; ++id)
    if (t.byte_of_[id] < 0) t.lookup_.emplace(t.pieces_[id], id);
  return t;
}

void Tokenizer::check_id(int id) const {
  if (id < 0 || id >= vocab_size())
    throw std::runtime_error("tokenizer: token id " + std::to_string(id) +
                             " is outside the vocabulary [0, " + std::to_string(vocab_size()) +
                             ")");
}

std::vector<int> Tokenizer::encode(const std::string& text, bool bos) const {
  std::vector<int> ids;  // symbols of the text before merging
  auto push_unit = [&](const std::string& unit) {
    const auto it = lookup_.find(unit);
    if (it != lookup_.end()) {
      ids.push_back(it->second);
      return;
    }
    for (unsigned char c : unit) {
      if (!byte_fallback_)
        throw std::runtime_error(
            "tokenizer: no piece for byte 0x" + std::string(1, "0123456789abcdef"[c >> 4]) +
            std::string(1, "0123456789abcdef"[c & 15]) + " and no byte-fallback tokens");
      ids.push_back(kFirstByteToken + c);
    }
  };
  if (!text.empty()) push_unit(" ");  // dummy prefix
  // UTF-8 units as run.c forms them: a non-continuation byte starts a unit, which takes
  // following continuation bytes up to 4 bytes in all.
  for (size_t i = 0; i < text.size();) {
    size_t j = i + 1;
    while (j < text.size() && j - i < 4 && (static_cast<unsigned char>(text[j]) & 0xC0) == 0x80)
      ++j;
    push_unit(text.substr(i, j - i));
    i = j;
  }

  // Greedy merges over a linked list. Heap order = run.c's scan order: best score, then
  // leftmost (list order equals original index order). Stale entries are skipped.
  const int n = static_cast<int>(ids.size());
  std::vector<int> next(n), prev(n);
  for (int i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  struct Cand {
    float score;
    int left, right, left_id, right_id, merged;
  };
  auto worse = [](const Cand& a, const Cand& b) {
    return a.score != b.score ? a.score < b.score : a.left > b.left;
  };
  std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
  std::string cat;
  auto consider = [&](int l, int r) {
    if (l < 0 || r < 0 || byte_of_[ids[l]] >= 0 || byte_of_[ids[r]] >= 0) return;
    cat.assign(pieces_[ids[l]]).append(pieces_[ids[r]]);
    const auto it = lookup_.find(cat);
    if (it == lookup_.end() || !(scores_[it->second] > kMinMergeScore)) return;
    heap.push({scores_[it->second], l, r, ids[l], ids[r], it->second});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i, i + 1);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    if (next[c.left] != c.right || ids[c.left] != c.left_id || ids[c.right] != c.right_id)
      continue;  // stale: a side was merged away or changed
    ids[c.left] = c.merged;
    const int r2 = next[c.right];
    next[c.left] = r2;
    if (r2 >= 0) prev[r2] = c.left;
    next[c.right] = prev[c.right] = -2;  // removed
    ids[c.right] = -1;
    consider(prev[c.left], c.left);
    consider(c.left, r2);
  }

  std::vector<int> out;
  out.reserve(n + 1);
  if (bos) out.push_back(kBos);
  for (int i = 0; i >= 0 && i < n; i = next[i]) out.push_back(ids[i]);
  return out;
}

std::string Tokenizer::decode_token(int prev, int id) const {
  check_id(id);
  if (byte_of_[id] >= 0) return std::string(1, static_cast<char>(byte_of_[id]));
  const std::string& p = pieces_[id];
  if (prev == kBos && !p.empty() && p[0] == ' ') return p.substr(1);
  return p;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string s;
  int prev = kBos;
  for (int id : ids) {
    check_id(id);
    if (id == kBos || id == kEos) {
      prev = id;
      continue;
    }
    s += decode_token(prev, id);
    prev = id;
  }
  return s;
}

}  // namespace mprefill
