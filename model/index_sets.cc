#include "model/index_sets.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <set>
#include <stdexcept>

namespace mprefill {
namespace {

constexpr int32_t kMagic = 0x5849504D;
constexpr int32_t kVersion = 1;
constexpr int32_t kKindVs = 1, kKindBs = 2;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("index file " + path + ": " + what);
}

class Writer {
 public:
  explicit Writer(const std::string& path)
      : path_(path), tmp_(path + ".tmp"), f_(tmp_, std::ios::binary) {
    if (!f_) fail(path, "cannot open for writing");
  }
  void put(int32_t v) { f_.write(reinterpret_cast<const char*>(&v), 4); }
  void commit() {
    f_.close();
    if (!f_ || std::rename(tmp_.c_str(), path_.c_str()) != 0) fail(path_, "write failed");
  }

 private:
  std::string path_, tmp_;
  std::ofstream f_;
};

class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path), f_(path, std::ios::binary) {
    if (!f_) fail(path, "cannot open");
  }
  int32_t get(const char* field) {
    int32_t v;
    if (!f_.read(reinterpret_cast<char*>(&v), 4)) fail(path_, std::string("truncated at ") + field);
    return v;
  }
  void expect_end() {
    if (f_.peek() != std::char_traits<char>::eof())
      fail(path_, "trailing bytes after the last head");
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ifstream f_;
};

void write_header(Writer& w, int32_t kind, int64_t n, int heads) {
  if (n <= 0 || n > INT32_MAX) throw std::runtime_error("index file: seq_len out of int32 range");
  for (int32_t v : {kMagic, kVersion, kind, static_cast<int32_t>(n), heads, kBlock}) w.put(v);
}

// Returns (N, H) after checking magic, version, kind and block.
std::pair<int64_t, int> read_header(Reader& r, int32_t want_kind) {
  if (r.get("magic") != kMagic) fail(r.path(), "bad magic (not an MPIX index file)");
  const int32_t version = r.get("version");
  if (version != kVersion) fail(r.path(), "unsupported version " + std::to_string(version));
  const int32_t kind = r.get("kind");
  if (kind != want_kind)
    fail(r.path(), "kind " + std::to_string(kind) + ", expected " + std::to_string(want_kind));
  const int32_t n = r.get("seq_len"), h = r.get("heads"), block = r.get("block");
  if (n <= 0) fail(r.path(), "seq_len " + std::to_string(n) + " must be positive");
  if (h <= 0) fail(r.path(), "heads " + std::to_string(h) + " must be positive");
  if (block != kBlock) fail(r.path(), "block " + std::to_string(block) + ", expected 64");
  return {n, h};
}

}  // namespace

IndexSetKind parse_index_set_kind(const std::string& name) {
  if (name == "uniform") return IndexSetKind::kUniform;
  if (name == "clustered") return IndexSetKind::kClustered;
  throw std::runtime_error("unknown index set '" + name + "' (expected uniform or clustered)");
}

VsSelection synthetic_vs(IndexSetKind kind, int64_t n, int v, int s, uint64_t seed) {
  v = clamp_vertical_budget(v, n);
  s = clamp_slash_budget(s, n);
  std::mt19937_64 g(seed);
  std::set<int> cols, offs;
  for (int c = 0; c < std::min<int64_t>(kForcedColumns, n) && static_cast<int>(cols.size()) < v;
       ++c)
    cols.insert(c);
  std::uniform_int_distribution<int64_t> any_col(0, n - 1);
  while (static_cast<int>(cols.size()) < v) cols.insert(static_cast<int>(any_col(g)));

  for (int d = 0; d < std::min<int64_t>(kForcedOffsets, n) && static_cast<int>(offs.size()) < s;
       ++d)
    offs.insert(d);
  if (kind == IndexSetKind::kUniform || n <= kForcedOffsets) {
    if (n > kForcedOffsets) {
      std::uniform_int_distribution<int64_t> any_off(kForcedOffsets, n - 1);
      while (static_cast<int>(offs.size()) < s) offs.insert(static_cast<int>(any_off(g)));
    }
  } else {
    std::bernoulli_distribution near(0.8);
    std::exponential_distribution<double> expo(1.0 / 2048.0);
    std::uniform_real_distribution<double> logu(std::log(100.0), std::log(static_cast<double>(n)));
    // Rejection stays fast while s is far below N; past 64 * s draws fill uniformly so a
    // budget close to N cannot spin (never reached by the published budget mixes).
    int64_t draws = 0;
    std::uniform_int_distribution<int64_t> any_off(kForcedOffsets, n - 1);
    while (static_cast<int>(offs.size()) < s) {
      int64_t d;
      if (++draws > 64LL * s) {
        d = any_off(g);
      } else if (near(g)) {
        d = kForcedOffsets + static_cast<int64_t>(std::floor(expo(g)));
      } else {
        d = static_cast<int64_t>(std::floor(std::exp(logu(g))));
      }
      if (d < n) offs.insert(static_cast<int>(d));
    }
  }
  VsSelection sel;
  sel.columns.assign(cols.begin(), cols.end());
  sel.offsets.assign(offs.rbegin(), offs.rend());
  return sel;
}

void save_vs_indices(const std::string& path, int64_t n, const std::vector<VsSelection>& heads) {
  Writer w(path);
  write_header(w, kKindVs, n, static_cast<int>(heads.size()));
  for (const auto& h : heads) {
    w.put(static_cast<int32_t>(h.columns.size()));
    w.put(static_cast<int32_t>(h.offsets.size()));
    for (int c : h.columns) w.put(c);
    for (int d : h.offsets) w.put(d);
  }
  w.commit();
}

std::vector<VsSelection> load_vs_indices(const std::string& path, int64_t* n_out) {
  Reader r(path);
  const auto [n, nh] = read_header(r, kKindVs);
  std::vector<VsSelection> heads(nh);
  for (int h = 0; h < nh; ++h) {
    const std::string at = "head " + std::to_string(h) + ": ";
    const int32_t nv = r.get("nnz_v"), ns = r.get("nnz_s");
    if (nv < 0 || nv > n) fail(path, at + "nnz_v " + std::to_string(nv) + " out of [0, N]");
    if (ns < 1 || ns > n) fail(path, at + "nnz_s " + std::to_string(ns) + " out of [1, N]");
    auto& sel = heads[h];
    sel.columns.resize(nv);
    sel.offsets.resize(ns);
    for (int i = 0; i < nv; ++i) {
      const int32_t c = sel.columns[i] = r.get("column");
      if (c < 0 || c >= n) fail(path, at + "column " + std::to_string(c) + " out of range");
      if (i > 0 && c <= sel.columns[i - 1])
        fail(path, at + "columns not strictly ascending at entry " + std::to_string(i));
    }
    for (int i = 0; i < ns; ++i) {
      const int32_t d = sel.offsets[i] = r.get("offset");
      if (d < 0 || d >= n) fail(path, at + "offset " + std::to_string(d) + " out of range");
      if (i > 0 && d >= sel.offsets[i - 1])
        fail(path, at + "offsets not strictly descending at entry " + std::to_string(i));
    }
    if (sel.offsets.back() != 0) fail(path, at + "offset 0 missing");
  }
  r.expect_end();
  if (n_out) *n_out = n;
  return heads;
}

void save_block_sparse_indices(const std::string& path, const BlockSparseIndex& ix) {
  Writer w(path);
  write_header(w, kKindBs, ix.seq_len, ix.num_heads);
  const int64_t per_head = ix.nblocks * ix.k;
  for (int h = 0; h < ix.num_heads; ++h) {
    w.put(ix.k);
    for (int64_t i = 0; i < per_head; ++i) w.put(ix.blocks[h * per_head + i]);
  }
  w.commit();
}

BlockSparseIndex load_block_sparse_indices(const std::string& path) {
  Reader r(path);
  const auto [n, nh] = read_header(r, kKindBs);
  BlockSparseIndex ix;
  ix.seq_len = n;
  ix.num_heads = nh;
  ix.nblocks = num_blocks(n);
  std::vector<std::vector<int>> per_head(nh);
  for (int h = 0; h < nh; ++h) {
    const std::string at = "head " + std::to_string(h) + ": ";
    const int32_t k = r.get("k");
    if (k < 1 || k > ix.nblocks) fail(path, at + "k " + std::to_string(k) + " out of [1, blocks]");
    ix.k = std::max(ix.k, k);
    auto& v = per_head[h];
    v.resize(ix.nblocks * k);
    for (int64_t b = 0; b < ix.nblocks; ++b) {
      bool padding = false;
      for (int i = 0; i < k; ++i) {
        const int32_t j = v[b * k + i] = r.get("block index");
        const std::string where = at + "query block " + std::to_string(b) + ": ";
        if (j == -1) {
          padding = true;
          continue;
        }
        if (padding) fail(path, where + "entry after -1 padding");
        if (j < 0 || j > b)
          fail(path,
               where + "key block " + std::to_string(j) + " not in [0, " + std::to_string(b) + "]");
        if (i > 0 && j <= v[b * k + i - 1]) fail(path, where + "key blocks not strictly ascending");
      }
    }
  }
  r.expect_end();
  ix.blocks.assign(static_cast<size_t>(nh) * ix.nblocks * ix.k, -1);
  for (int h = 0; h < nh; ++h) {
    const int k = static_cast<int>(per_head[h].size() / ix.nblocks);
    for (int64_t b = 0; b < ix.nblocks; ++b)
      for (int i = 0; i < k; ++i)
        ix.blocks[(h * ix.nblocks + b) * ix.k + i] = per_head[h][b * k + i];
  }
  return ix;
}

}  // namespace mprefill
