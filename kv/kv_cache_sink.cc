#include "kv/kv_cache_sink.h"

#include <algorithm>
#include <stdexcept>

#include "kernels/edge_check.h"

namespace mprefill {

KvCacheSink::KvCacheSink(KvCache* cache, int head_dim) : cache_(cache), head_dim_(head_dim) {
  if (!cache_) throw std::runtime_error("KvCacheSink: no cache");
  if (head_dim_ <= 0 || cache_->kv_dim % head_dim_ != 0)
    throw std::runtime_error("KvCacheSink: head_dim " + std::to_string(head_dim) +
                             " does not divide the cache's kv_dim " +
                             std::to_string(cache_->kv_dim));
}

void KvCacheSink::put(const KvSlice& s) {
  const std::string where = "KvCacheSink: layer " + std::to_string(s.layer) + ": ";
  if (s.on_device || (s.dtype != DType::kF32 && s.dtype != DType::kBF16))
    throw std::runtime_error(where + "only fp32 or bf16 host slices are supported");
  if (s.dtype == DType::kBF16 && cache_->dtype != DType::kBF16)
    throw std::runtime_error(where + "a bf16 slice needs a bf16 cache");
  if (s.layer < 0 || s.layer >= cache_->n_layers)
    throw std::runtime_error(where + "layer out of range");
  if (s.head_dim != head_dim_) throw std::runtime_error(where + "head_dim mismatch");
  const int n_kv = cache_->kv_dim / head_dim_;
  for (int h : s.kv_heads)
    if (h < 0 || h >= n_kv) throw std::runtime_error(where + "kv head out of range");
  const int64_t width = static_cast<int64_t>(s.kv_heads.size()) * head_dim_;
  const float* k = static_cast<const float*>(s.k);
  const float* v = static_cast<const float*>(s.v);
  const auto* k16 = static_cast<const uint16_t*>(s.k);
  const auto* v16 = static_cast<const uint16_t*>(s.v);
  int64_t row = 0;
  for (auto [b, e] : s.tokens) {
    if (b < 0 || e < b || e > cache_->capacity)
      throw std::runtime_error(where + "token range [" + std::to_string(b) + ", " +
                               std::to_string(e) + ") outside the cache capacity " +
                               std::to_string(cache_->capacity));
    for (int64_t t = b; t < e; ++t, ++row) {
      for (size_t i = 0; i < s.kv_heads.size(); ++i) {
        const int64_t src = row * width + static_cast<int64_t>(i) * head_dim_;
        const int64_t dst = t * cache_->kv_dim + int64_t{s.kv_heads[i]} * head_dim_;
        if (cache_->dtype == DType::kF32) {
          std::copy_n(k + src, head_dim_, cache_->k[s.layer].data() + dst);
          std::copy_n(v + src, head_dim_, cache_->v[s.layer].data() + dst);
        } else if (s.dtype == DType::kBF16) {  // bf16 as is
          std::copy_n(k16 + src, head_dim_, cache_->k16[s.layer].data() + dst);
          std::copy_n(v16 + src, head_dim_, cache_->v16[s.layer].data() + dst);
        } else {  // fp32 rows into a bf16 cache: rounded to nearest even
          for (int d = 0; d < head_dim_; ++d) {
            cache_->k16[s.layer][dst + d] = f32_to_bf16(k[src + d]);
            cache_->v16[s.layer][dst + d] = f32_to_bf16(v[src + d]);
          }
        }
      }
    }
    max_end_ = std::max(max_end_, e);
  }
  bytes_ += 2 * s.bytes_per_tensor();
  pieces_.push_back({s.layer, s.kv_heads, s.tokens});
}

void KvCacheSink::finish() { cache_->n_tokens = max_end_; }

namespace {

// Piece list as int64: [count, then per piece: layer, nh, heads..., nr, (b, e)...].
std::vector<int64_t> encode(const std::vector<KvPiece>& pieces) {
  std::vector<int64_t> m{static_cast<int64_t>(pieces.size())};
  for (const auto& p : pieces) {
    m.push_back(p.layer);
    m.push_back(static_cast<int64_t>(p.kv_heads.size()));
    m.insert(m.end(), p.kv_heads.begin(), p.kv_heads.end());
    m.push_back(static_cast<int64_t>(p.tokens.size()));
    for (auto [b, e] : p.tokens) {
      m.push_back(b);
      m.push_back(e);
    }
  }
  return m;
}

std::vector<KvPiece> decode(const std::vector<int64_t>& m, int from) {
  std::vector<KvPiece> out;
  size_t at = 0;
  auto next = [&]() -> int64_t {
    if (at >= m.size())
      throw std::runtime_error("gather_kv_cache: truncated piece list from rank " +
                               std::to_string(from));
    return m[at++];
  };
  const int64_t n = next();
  for (int64_t i = 0; i < n; ++i) {
    KvPiece p;
    p.layer = static_cast<int>(next());
    const int64_t nh = next();
    for (int64_t j = 0; j < nh; ++j) p.kv_heads.push_back(static_cast<int>(next()));
    const int64_t nr = next();
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t b = next();
      p.tokens.emplace_back(b, next());
    }
    out.push_back(std::move(p));
  }
  return out;
}

int64_t piece_values(const KvPiece& p, int head_dim) {
  int64_t rows = 0;
  for (auto [b, e] : p.tokens) rows += e - b;
  return rows * static_cast<int64_t>(p.kv_heads.size()) * head_dim;
}

}  // namespace

void gather_kv_cache(comm::Communicator& c, const KvCacheSink& mine, int root, int64_t n_tokens,
                     KvCache* out) {
  const KvCache& src = mine.cache();
  if (src.dtype != DType::kF32 || (out && out->dtype != DType::kF32))
    throw std::runtime_error("gather_kv_cache: fp32 caches only");
  const int rank = c.rank(), size = c.size(), hd = mine.head_dim();
  const int64_t kv_dim = src.kv_dim;
  if (root < 0 || root >= size)
    throw std::runtime_error("gather_kv_cache: root " + std::to_string(root) + " out of range");
  auto values_of = [&](const KvPiece& p, std::vector<float>* buf) {
    for (const auto* base : {&src.k[p.layer], &src.v[p.layer]})
      for (auto [b, e] : p.tokens)
        for (int64_t t = b; t < e; ++t)
          for (int h : p.kv_heads) {
            const float* row = base->data() + t * kv_dim + int64_t{h} * hd;
            buf->insert(buf->end(), row, row + hd);
          }
  };
  if (rank != root) {
    const std::vector<int64_t> meta = encode(mine.pieces());
    std::vector<float> vals;
    for (const auto& p : mine.pieces()) values_of(p, &vals);
    const int64_t sizes[2] = {static_cast<int64_t>(meta.size()), static_cast<int64_t>(vals.size())};
    MPREFILL_EDGE_CHECK(c.send(sizes, 2, DType::kI64, root, nullptr), "gather_kv_cache: send sizes",
                        c.last_error());
    MPREFILL_EDGE_CHECK(c.send(meta.data(), meta.size(), DType::kI64, root, nullptr),
                        "gather_kv_cache: send piece list", c.last_error());
    if (!vals.empty())
      MPREFILL_EDGE_CHECK(c.send(vals.data(), vals.size(), DType::kF32, root, nullptr),
                          "gather_kv_cache: send values", c.last_error());
    return;
  }
  if (!out) throw std::runtime_error("gather_kv_cache: no output cache on the root");
  if (out->n_layers != src.n_layers || out->kv_dim != kv_dim || out->capacity < n_tokens)
    throw std::runtime_error("gather_kv_cache: output cache shape or capacity does not fit");
  const int n_kv = static_cast<int>(kv_dim / hd);
  std::vector<uint8_t> seen(static_cast<size_t>(src.n_layers) * n_kv * n_tokens, 0);
  auto place = [&](const std::vector<KvPiece>& pieces, const std::vector<float>& vals, int from) {
    size_t at = 0;
    for (const auto& p : pieces) {
      if (at + 2 * piece_values(p, hd) > vals.size())
        throw std::runtime_error("gather_kv_cache: too few values from rank " +
                                 std::to_string(from));
      for (auto* base : {&out->k[p.layer], &out->v[p.layer]}) {
        const bool first = base == &out->k[p.layer];
        for (auto [b, e] : p.tokens) {
          if (b < 0 || e > n_tokens || b > e)
            throw std::runtime_error("gather_kv_cache: rank " + std::to_string(from) +
                                     " sent tokens outside [0, " + std::to_string(n_tokens) + ")");
          for (int64_t t = b; t < e; ++t)
            for (int h : p.kv_heads) {
              if (h < 0 || h >= n_kv)
                throw std::runtime_error("gather_kv_cache: bad kv head from rank " +
                                         std::to_string(from));
              if (first && seen[(static_cast<size_t>(p.layer) * n_kv + h) * n_tokens + t]++)
                throw std::runtime_error("gather_kv_cache: layer " + std::to_string(p.layer) +
                                         " kv head " + std::to_string(h) + " token " +
                                         std::to_string(t) + " arrived twice");
              std::copy_n(vals.data() + at, hd, base->data() + t * kv_dim + int64_t{h} * hd);
              at += hd;
            }
        }
      }
    }
  };
  {
    std::vector<float> vals;
    for (const auto& p : mine.pieces()) values_of(p, &vals);
    place(mine.pieces(), vals, rank);
  }
  for (int from = 0; from < size; ++from) {
    if (from == root) continue;
    int64_t sizes[2] = {0, 0};
    MPREFILL_EDGE_CHECK(c.recv(sizes, 2, DType::kI64, from, nullptr), "gather_kv_cache: recv sizes",
                        c.last_error());
    std::vector<int64_t> meta(static_cast<size_t>(sizes[0]));
    MPREFILL_EDGE_CHECK(c.recv(meta.data(), meta.size(), DType::kI64, from, nullptr),
                        "gather_kv_cache: recv piece list", c.last_error());
    std::vector<float> vals(static_cast<size_t>(sizes[1]));
    if (!vals.empty())
      MPREFILL_EDGE_CHECK(c.recv(vals.data(), vals.size(), DType::kF32, from, nullptr),
                          "gather_kv_cache: recv values", c.last_error());
    place(decode(meta, from), vals, from);
  }
  for (size_t i = 0; i < seen.size(); ++i)
    if (!seen[i]) {
      const int64_t t = static_cast<int64_t>(i % n_tokens);
      const int64_t lh = static_cast<int64_t>(i / n_tokens);
      throw std::runtime_error("gather_kv_cache: layer " + std::to_string(lh / n_kv) + " kv head " +
                               std::to_string(lh % n_kv) + " token " + std::to_string(t) +
                               " came from no rank");
    }
  out->n_tokens = n_tokens;
}

}  // namespace mprefill
