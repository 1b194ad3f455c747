// llama2.c tokenizer: the real stories15M tokenizer.bin, synthetic files, bad files.
#include "model/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "tests/testutil.h"

namespace mprefill {
namespace {

std::string tokenizer_path() { return test::shared_dir() + "/models/stories15M/tokenizer.bin"; }

#define SKIP_WITHOUT_TOKENIZER() MPREFILL_SKIP_IF_MISSING(tokenizer_path())

class TempDir {
 public:
  TempDir() {
    std::string t = (std::filesystem::temp_directory_path() / "mprefill_tok_XXXXXX").string();
    if (!::mkdtemp(t.data())) throw std::runtime_error("mkdtemp failed");
    path_ = t;
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Serialise a vocabulary in tokenizer.bin format.
std::string make_tokenizer(const std::vector<std::pair<std::string, float>>& vocab) {
  int32_t max_len = 1;
  for (const auto& [s, _] : vocab) max_len = std::max<int32_t>(max_len, int32_t(s.size()));
  std::string out(reinterpret_cast<const char*>(&max_len), 4);
  for (const auto& [s, score] : vocab) {
    const int32_t len = int32_t(s.size());
    out.append(reinterpret_cast<const char*>(&score), 4);
    out.append(reinterpret_cast<const char*>(&len), 4);
    out += s;
  }
  return out;
}

// <unk>, BOS, EOS, "<0xHH>" byte tokens (llama2.c's export), then `pieces`.
std::vector<std::pair<std::string, float>> llama2c_vocab(
    const std::vector<std::pair<std::string, float>>& pieces) {
  std::vector<std::pair<std::string, float>> v = {
      {"<unk>", 0.f}, {"\n<s>\n", 0.f}, {"\n</s>\n", 0.f}};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    v.push_back({buf, 0.f});
  }
  v.insert(v.end(), pieces.begin(), pieces.end());
  return v;
}

// Naive run.c-style encoder (O(n^2) rescans) over a vocabulary, with the same rules as
// Tokenizer: control tokens (0..2) and byte tokens (3..258) are neither looked up by text
// nor merged.
std::vector<int> naive_encode(const Tokenizer& tok, const std::string& text, bool bos) {
  std::unordered_map<std::string, int> lookup;
  for (int id = 259; id < tok.vocab_size(); ++id) lookup.emplace(tok.piece(id), id);
  std::vector<int> t;
  auto unit = [&](const std::string& u) {
    auto it = lookup.find(u);
    if (it != lookup.end()) {
      t.push_back(it->second);
    } else {
      for (unsigned char c : u) t.push_back(c + 3);
    }
  };
  if (!text.empty()) unit(" ");
  std::string buf;
  for (size_t i = 0; i < text.size(); ++i) {
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) buf.clear();
    buf += text[i];
    if (i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80 &&
        buf.size() < 4)
      continue;
    unit(buf);
    buf.clear();
  }
  while (true) {
    float best = -1e10f;
    int best_id = -1, best_i = -1;
    for (size_t i = 0; i + 1 < t.size(); ++i) {
      if (t[i] < 259 || t[i + 1] < 259) continue;
      auto it = lookup.find(tok.piece(t[i]) + tok.piece(t[i + 1]));
      if (it != lookup.end() && tok.score(it->second) > best) {
        best = tok.score(it->second);
        best_id = it->second;
        best_i = int(i);
      }
    }
    if (best_i < 0) break;
    t[best_i] = best_id;
    t.erase(t.begin() + best_i + 1);
  }
  if (bos) t.insert(t.begin(), Tokenizer::kBos);
  return t;
}

TEST(Tokenizer, EncodesStoriesPrompt) {
  SKIP_WITHOUT_TOKENIZER();
  const Tokenizer tok = Tokenizer::load(tokenizer_path(), 32000);
  EXPECT_EQ(tok.vocab_size(), 32000);
  EXPECT_EQ(tok.encode("Once upon a time", true), (std::vector<int>{1, 9038, 2501, 263, 931}));
  EXPECT_EQ(tok.encode("Once upon a time", false), (std::vector<int>{9038, 2501, 263, 931}));
  EXPECT_EQ(tok.encode("", true), (std::vector<int>{1}));
  EXPECT_TRUE(tok.encode("", false).empty());
  EXPECT_EQ(tok.decode_token(1, 9038), "Once");  // leading space dropped after BOS
  EXPECT_EQ(tok.decode_token(9038, 2501), " upon");
  EXPECT_EQ(tok.decode_token(931, 13), "\n");  // byte token of 0x0A
  EXPECT_EQ(tok.decode_token(1, 35), " ");     // byte token of 0x20 keeps its space
  EXPECT_THROW(tok.decode_token(1, 32000), std::runtime_error);
  EXPECT_THROW(tok.decode_token(1, -1), std::runtime_error);
}

TEST(Tokenizer, RoundTripsIncludingUtf8) {
  SKIP_WITHOUT_TOKENIZER();
  const Tokenizer tok = Tokenizer::load(tokenizer_path());
  const std::string texts[] = {
      "Once upon a time, there was a little girl named Lily.",
      "Hello,  world!\n\tTabs and\nnew lines.  ",
      " leading space",
      "naïve café — déjà vu",
      "日本語のテキスト and 中文",
      "emoji \xF0\x9F\x99\x82 and \xC3\xBF (y-diaeresis) and \x7F",
      "stray continuation \x80\x80 bytes",
      "12345 + 67890 = 80235",
  };
  for (const std::string& s : texts) {
    for (bool bos : {true, false}) {
      const std::vector<int> ids = tok.encode(s, bos);
      EXPECT_EQ(tok.decode(ids), s) << "bos=" << bos;
      EXPECT_EQ(ids, naive_encode(tok, s, bos)) << s;
      for (int id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size());
    }
  }
  // A codepoint without a piece falls back to its UTF-8 bytes (ids byte + 3).
  const std::vector<int> emoji = tok.encode("\xF0\x9F\x99\x82", false);
  EXPECT_EQ(emoji, (std::vector<int>{29871, 0xF0 + 3, 0x9F + 3, 0x99 + 3, 0x82 + 3}));
}

TEST(Tokenizer, HeapMergesEqualNaiveScanOnRandomText) {
  SKIP_WITHOUT_TOKENIZER();
  const Tokenizer tok = Tokenizer::load(tokenizer_path());
  const char* words[] = {"the", " cat", "sat",   "on", " mat", "é", "ß", "\n", "  ", "Lily",
                         "ing", "un",   "happy", ",",  ".",    "7", "ö", "語", "a",  "b"};
  std::mt19937_64 g(5);
  for (int trial = 0; trial < 40; ++trial) {
    std::string s;
    const int n = 1 + int(g() % 60);
    for (int i = 0; i < n; ++i) s += words[g() % std::size(words)];
    ASSERT_EQ(tok.encode(s, true), naive_encode(tok, s, true)) << s;
    ASSERT_EQ(tok.decode(tok.encode(s, true)), s);
  }
}

TEST(Tokenizer, LongTextIsFast) {
  SKIP_WITHOUT_TOKENIZER();
  const Tokenizer tok = Tokenizer::load(tokenizer_path());
  std::string s;
  while (s.size() < (2u << 20)) s += "Once upon a time, there was a little girl named Lily. ";
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int> ids = tok.encode(s, true);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GT(ids.size(), 300000u);
  EXPECT_LT(sec, 60.0) << "2 MiB took " << sec << " s";  // a quadratic scan would take hours
  EXPECT_EQ(tok.decode(ids), s);
}

TEST(Tokenizer, SyntheticMergeOrder) {
  TempDir dir;
  // " " -1, "a" 0, "aa" -5, " a" -10: "aaa" -> [" ", "a","a","a"]; both "aa" pairs score
  // -5, the leftmost wins -> [" ", "aa", "a"]; nothing else merges.
  const auto vocab = llama2c_vocab({{" ", -1.f},
                                    {"a", 0.f},
                                    {"aa", -5.f},
                                    {" a", -10.f},
                                    {"b", 0.f},
                                    {"ab", -3.f},
                                    {" ab", -1.f},
                                    {"x", -1e10f},
                                    {"xx", -2e10f}});
  write_all(dir.file("t.bin"), make_tokenizer(vocab));
  const Tokenizer tok = Tokenizer::load(dir.file("t.bin"));
  const int sp = 259, a = 260, aa = 261, sp_a = 262, ab = 264, sp_ab = 265, x = 266;
  EXPECT_EQ(tok.encode("aaa", false), (std::vector<int>{sp, aa, a}));
  // "ab" (-3) beats " a" (-10); then " ab" (-1) merges the result.
  EXPECT_EQ(tok.encode("ab", true), (std::vector<int>{1, sp_ab}));
  EXPECT_EQ(tok.encode("a", false), (std::vector<int>{sp_a}));
  (void)ab;
  // Scores at or below run.c's -1e10 floor never merge.
  EXPECT_EQ(tok.encode("xx", false), (std::vector<int>{sp, x, x}));
  // Unknown codepoints use the "<0xHH>" byte tokens; decoding gives raw bytes back.
  const std::vector<int> ids = tok.encode("a\xC3\xA9!", false);
  EXPECT_EQ(ids, (std::vector<int>{sp_a, 0xC3 + 3, 0xA9 + 3, '!' + 3}));
  EXPECT_EQ(tok.decode(ids), "a\xC3\xA9!");
  EXPECT_EQ(tok.decode_token(1, 0x41 + 3), "A");
  // A literal "<0x41>" in the text is text, not the byte token of 'A'.
  const std::vector<int> lit = tok.encode("<0x41>", false);
  EXPECT_EQ(std::count(lit.begin(), lit.end(), 'A' + 3), 0);
  EXPECT_EQ(tok.decode(lit), "<0x41>");
}

TEST(Tokenizer, BadFilesGiveClearErrors) {
  TempDir dir;
  auto expect_error = [](const std::string& path, int expected_vocab, const std::string& needle) {
    try {
      Tokenizer::load(path, expected_vocab);
      ADD_FAILURE() << "no error for " << path << " (" << needle << ")";
    } catch (const std::runtime_error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(needle), std::string::npos) << m;
      EXPECT_NE(m.find(path), std::string::npos) << m;
    }
  };
  expect_error(dir.file("missing.bin"), 0, "cannot open");
  std::filesystem::create_directory(dir.file("adir"));
  expect_error(dir.file("adir"), 0, "directory");
  write_all(dir.file("empty.bin"), "");
  expect_error(dir.file("empty.bin"), 0, "truncated");
  const std::string good = make_tokenizer(llama2c_vocab({{" ", -1.f}, {"a", 0.f}}));
  write_all(dir.file("cut.bin"), good.substr(0, good.size() - 1));  // mid-record
  expect_error(dir.file("cut.bin"), 0, "truncated");
  write_all(dir.file("cut2.bin"), good.substr(0, 4 + 8 + 5 + 2));  // inside token 1's header
  expect_error(dir.file("cut2.bin"), 0, "token 1");
  std::string bad_len = good;
  const int32_t huge = 1 << 30;
  std::memcpy(bad_len.data() + 4 + 4, &huge, 4);  // token 0's length
  write_all(dir.file("badlen.bin"), bad_len);
  expect_error(dir.file("badlen.bin"), 0, "length");
  std::string bad_hdr = good;
  const int32_t neg = -3;
  std::memcpy(bad_hdr.data(), &neg, 4);
  write_all(dir.file("badhdr.bin"), bad_hdr);
  expect_error(dir.file("badhdr.bin"), 0, "max_token_length");
  write_all(dir.file("good.bin"), good);
  expect_error(dir.file("good.bin"), 32000, "vocab_size is 32000");
  EXPECT_EQ(Tokenizer::load(dir.file("good.bin"), 261).vocab_size(), 261);

  SKIP_WITHOUT_TOKENIZER();  // the cuts of the real file below
  const std::string real = read_all(tokenizer_path());
  write_all(dir.file("half.bin"), real.substr(0, real.size() / 2));
  expect_error(dir.file("half.bin"), 0, "truncated");
  // Cut at a record boundary: only the expected vocabulary size can tell.
  size_t off = 4;
  for (int i = 0; i < 31000; ++i) {
    int32_t len;
    std::memcpy(&len, real.data() + off + 4, 4);
    off += 8 + size_t(len);
  }
  write_all(dir.file("short.bin"), real.substr(0, off));
  expect_error(dir.file("short.bin"), 32000, "has 31000 tokens");
}

}  // namespace
}  // namespace mprefill
