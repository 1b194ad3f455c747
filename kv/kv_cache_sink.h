// KvSink into a KvCache (host memory), and the gather of a KV cache that is spread
// over the ranks of a distributed prefill (each rank holding some (kv heads, token
// ranges) per layer) onto one rank, for tests and for decoding on that rank.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kv/kv_cache.h"
#include "kv/kv_sink.h"

namespace mprefill {

// What a sink received for one layer: the slice's heads and token ranges (no data).
struct KvPiece {
  int layer = 0;
  std::vector<int> kv_heads;
  std::vector<std::pair<int64_t, int64_t>> tokens;
};

// Writes each slice into the rows / head columns of a KvCache it does not own. Slices
// must be host memory with the cache's head_dim, tokens inside the capacity: fp32 (into
// an fp32 cache, or rounded into a bf16 one) or bf16 (into a bf16 cache, as is).
// finish() sets cache->n_tokens to the end of the last token range seen (a full prefill
// on one rank: the prompt length; a distributed one: call gather_kv_cache).
class KvCacheSink : public KvSink {
 public:
  KvCacheSink(KvCache* cache, int head_dim);
  void put(const KvSlice& slice) override;
  void finish() override;

  const KvCache& cache() const { return *cache_; }
  const std::vector<KvPiece>& pieces() const { return pieces_; }
  int64_t bytes() const { return bytes_; }
  int head_dim() const { return head_dim_; }

 private:
  KvCache* cache_;
  int head_dim_;
  int64_t max_end_ = 0, bytes_ = 0;
  std::vector<KvPiece> pieces_;
};

// Collective over `c`: every rank sends the pieces its sink received (heads, ranges and
// the K / V values taken from its cache) to `root`, which writes them into `out` (same
// model shape, capacity >= n_tokens) and checks that every (layer, kv head, token) in
// [0, n_tokens) arrived exactly once; then out->n_tokens = n_tokens. Other ranks leave
// `out` alone (may be null). fp32 caches only. Throws std::runtime_error naming the rank on a
// communication failure or a coverage gap / overlap.
void gather_kv_cache(comm::Communicator& c, const KvCacheSink& mine, int root, int64_t n_tokens,
                     KvCache* out);

}  // namespace mprefill
