// The decoder's paged KV store and the page cutting both ends of the KV handoff agree on.
//
// Page geometry: pages cover global token blocks [b * P, (b + 1) * P) (P = page_tokens).
// A sender cuts each of its global token ranges at those block boundaries, so a received
// page lies inside one block and never spans two ranges; it carries a subset of the KV
// heads (a tensor-parallel rank's). The store keeps, per job and layer, one fixed-size
// page per block holding every KV head: K then V, each [P][n_kv_heads][head_dim] in the
// contract's dtype (bf16 or fp32, token-major, the KvCache row layout), so a layer
// exports with one copy per page and a bf16 KV costs bf16 bytes end to end.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/types.h"

namespace mprefill::kv {

struct PageCut {
  int64_t token_begin = 0, token_end = 0;  // global [begin, end)
  int64_t row0 = 0;                        // first row of the page in the slice
};

// Pages of a slice whose rows are the global ranges `ranges` (ascending, disjoint, each
// non-empty) in order. Throws std::invalid_argument on bad ranges or page_tokens < 1.
std::vector<PageCut> cut_pages(const std::vector<std::pair<int64_t, int64_t>>& ranges,
                               int page_tokens);

struct KvStoreShape {
  int n_layers = 0, n_kv_heads = 0, head_dim = 0;
  int page_tokens = 256;
  DType dtype = DType::kF32;  // of the stored KV: kF32 or kBF16 (the contract's)
  int64_t kv_dim() const { return int64_t{n_kv_heads} * head_dim; }
  int64_t elem_bytes() const { return dtype_size(dtype); }
  int64_t page_elems() const { return kv_dim() * page_tokens; }           // per tensor
  int64_t page_bytes() const { return 2 * page_elems() * elem_bytes(); }  // K and V
  // KV bytes of a job of n tokens (what capacity is counted in): 2 x n x kv_dim x
  // dtype bytes x layers.
  uint64_t kv_bytes(int64_t n_tokens) const;
  // Store pages of a job of n tokens: n_layers * ceil(n / P).
  int64_t pages_for(int64_t n_tokens) const;
  void validate() const;  // throws std::invalid_argument naming the field (dtype too)
};

// A page that a store rejects (bad geometry, checksum, overlap); what() is one line.
class PageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Fixed-size page buffers shared by every job of a decoder, with a byte budget: a job
// reserves its KV up front (admission), then takes and returns buffers. The budget counts
// a job's KV bytes in the stored dtype (KvStoreShape::kv_bytes: what the coordinator
// admits jobs by), so both sides agree on what fits; the partly used last page of each layer makes
// the memory held exceed it by less than one page per layer and job. Thread-safe.
//
// Draining bytes: reservations of stores that were released or failed (retire()) but are
// still alive because an in-flight put holds a reference; they return within moments, so
// an admission that fits once they are gone may wait for them (bounded), while one that
// would not fit even then is refused at once. Invariant: draining <= reserved.
class PagePool {
 public:
  PagePool(const KvStoreShape& shape, uint64_t capacity_bytes);
  // false (with *why: the byte numbers) when kv_bytes do not fit next to the reservations
  // held. When they would fit once the draining reservations are gone, waits up to wait_ms
  // for that (0: refuse at once); *why then says how long it waited and what still drained.
  bool reserve(int64_t pages, uint64_t kv_bytes, std::string* why, int wait_ms = 0);
  // Returns a reservation; draining: it was retired (its bytes leave the draining count).
  void unreserve(int64_t pages, uint64_t kv_bytes, bool draining = false);
  // Marks kv_bytes of the reservations held as draining (see above).
  void retire(uint64_t kv_bytes);
  std::unique_ptr<char[]> take();  // a page_bytes() buffer (contents undefined)
  void give(std::unique_ptr<char[]> page);
  const KvStoreShape& shape() const { return shape_; }
  uint64_t capacity_bytes() const { return capacity_; }
  uint64_t reserved_bytes() const;
  uint64_t draining_bytes() const;
  static constexpr size_t kKeepFreePages = 64;

 private:
  KvStoreShape shape_;
  uint64_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable drained_;  // a reservation returned (under mu_)
  int64_t reserved_pages_ = 0;
  uint64_t reserved_bytes_ = 0;
  uint64_t draining_bytes_ = 0;
  std::vector<std::unique_ptr<char[]>> free_;
};

// One received page as the wire delivers it.
struct PageIn {
  int layer = 0;
  std::vector<int> kv_heads;  // ascending model KV heads
  int64_t token_begin = 0, token_end = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;  // kF32 or kBF16 (converted to the store's dtype when they differ)
  const void* k = nullptr;    // [tokens][kv_heads][head_dim]
  const void* v = nullptr;
  size_t k_bytes = 0, v_bytes = 0;
  uint32_t crc32c = 0;  // of k then v
};

// The KV of one job: n_tokens rows per layer, filled by pages from any number of
// senders in any order (thread-safe), each (layer, token, head) cell exactly once.
class JobKvStore {
 public:
  // Reserves the job's pages in pool (throws PageError "decoder KV store full" with the
  // numbers when they do not fit; PagePool::reserve waits up to wait_ms for draining
  // reservations); the destructor returns buffers and reservation.
  JobKvStore(PagePool* pool, int64_t n_tokens, int wait_ms = 0);
  ~JobKvStore();
  JobKvStore(const JobKvStore&) = delete;
  JobKvStore& operator=(const JobKvStore&) = delete;

  // The job was released or failed: its reservation counts as draining until the last
  // reference (an in-flight put) drops the store. Idempotent.
  void retire();

  // Checks geometry, checksum and overlap, then stores. Returns true when this page
  // completed its layer. Throws PageError (the store is unchanged). Puts of one job run in
  // parallel: the checksum and the copy of the bytes run outside the store's lock (the
  // page's cells are taken under it first, so an overlapping page is refused).
  bool put(const PageIn& page);
  // A page whose bytes live elsewhere (transport "ipc": the job's device region): the
  // same geometry and overlap checks and cell accounting as put(), no bytes (k / v and
  // the sizes are ignored). Returns true when this page completed its layer.
  bool mark(const PageIn& page);

  bool layer_complete(int layer) const;
  int layers_complete() const;
  bool complete() const;
  int64_t n_tokens() const { return n_tokens_; }
  uint64_t bytes_received() const;  // page payload bytes as sent (k + v)

  // Copies a complete layer into k_out / v_out, each [n_tokens][kv_dim] (KvCache rows)
  // of shape().dtype.
  void export_layer(int layer, void* k_out, void* v_out) const;
  const KvStoreShape& shape() const { return shape_; }
  // Returns a layer's page buffers to the pool (after export).
  void release_layer(int layer);

 private:
  struct Layer {
    std::vector<std::unique_ptr<char[]>> pages;        // [block]: K then V
    std::vector<std::map<int64_t, int64_t>> received;  // [head]: begin -> end
    int64_t cells = 0;  // (token, head) pairs taken by a put (stored once inflight is 0)
    int inflight = 0;   // puts copying their bytes outside mu_
    bool released = false;
    bool reported = false;  // a put or mark returned true for this layer
  };
  PagePool* pool_;
  KvStoreShape shape_;
  int64_t n_tokens_, n_blocks_, pages_reserved_;
  uint64_t bytes_reserved_;
  std::atomic<bool> retired_{false};
  mutable std::mutex mu_;
  std::vector<Layer> layers_;
  uint64_t bytes_ = 0;

  void check_geometry(const PageIn& p) const;
  void check_page(const PageIn& p) const;  // geometry, sizes, checksum
  void check_overlap_locked(const Layer& L, const PageIn& p) const;
  // Records the page's cells (an overlapping page is refused from here on).
  void record_locked(Layer& L, const PageIn& p);
  // Every cell taken and no copy in flight: complete. True once per layer (the caller that
  // completed it).
  bool complete_locked(const Layer& L) const;
  bool report_locked(Layer& L);
  std::condition_variable idle_;  // a layer's inflight fell to 0 (under mu_)
};

}  // namespace mprefill::kv
