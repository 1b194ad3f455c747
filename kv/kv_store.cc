#include "kv/kv_store.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "kv/crc32c.h"

namespace mprefill::kv {
namespace {

std::string range_str(int64_t b, int64_t e) {
  return "[" + std::to_string(b) + ", " + std::to_string(e) + ")";
}

// n values of dtype `from` at src to the other one at dst (kF32 <-> kBF16; memcpy is
// unaligned-safe for rows inside a received frame).
void convert_row(DType from, const char* src, char* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    if (from == DType::kBF16) {
      uint16_t h;
      std::memcpy(&h, src + 2 * d, 2);
      const float f = bf16_to_f32(h);
      std::memcpy(dst + 4 * d, &f, 4);
    } else {
      float f;
      std::memcpy(&f, src + 4 * d, 4);
      const uint16_t h = f32_to_bf16(f);
      std::memcpy(dst + 2 * d, &h, 2);
    }
  }
}

}  // namespace

std::vector<PageCut> cut_pages(const std::vector<std::pair<int64_t, int64_t>>& ranges,
                               int page_tokens) {
  if (page_tokens < 1)
    throw std::invalid_argument("page_tokens must be >= 1, got " + std::to_string(page_tokens));
  std::vector<PageCut> out;
  int64_t row = 0, prev_end = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const auto [b, e] = ranges[i];
    if (b < prev_end || e <= b)
      throw std::invalid_argument("token range " + std::to_string(i) + " " + range_str(b, e) +
                                  " is empty, negative or not after the previous one");
    for (int64_t t = b; t < e;) {
      const int64_t block_end = (t / page_tokens + 1) * page_tokens;
      const int64_t te = std::min(e, block_end);
      out.push_back({t, te, row});
      row += te - t;
      t = te;
    }
    prev_end = e;
  }
  return out;
}

int64_t KvStoreShape::pages_for(int64_t n_tokens) const {
  return int64_t{n_layers} * ((n_tokens + page_tokens - 1) / page_tokens);
}

uint64_t KvStoreShape::kv_bytes(int64_t n_tokens) const {
  return uint64_t{2} * static_cast<uint64_t>(n_tokens) * static_cast<uint64_t>(kv_dim()) *
         static_cast<uint64_t>(elem_bytes()) * static_cast<uint64_t>(n_layers);
}

void KvStoreShape::validate() const {
  if (n_layers < 1 || n_kv_heads < 1 || head_dim < 1)
    throw std::invalid_argument("KV store shape: layers " + std::to_string(n_layers) +
                                ", kv heads " + std::to_string(n_kv_heads) + ", head_dim " +
                                std::to_string(head_dim) + " must all be >= 1");
  if (page_tokens < 1 || page_tokens > (1 << 20))
    throw std::invalid_argument("KV store shape: page_tokens must be in [1, 2^20], got " +
                                std::to_string(page_tokens));
  if (dtype != DType::kF32 && dtype != DType::kBF16)
    throw std::invalid_argument(std::string("KV store shape: dtype ") + to_string(dtype) +
                                " is not f32 or bf16");
}

// ---- PagePool ---------------------------------------------------------------------

PagePool::PagePool(const KvStoreShape& shape, uint64_t capacity_bytes)
    : shape_(shape), capacity_(capacity_bytes) {
  shape_.validate();
}

bool PagePool::reserve(int64_t pages, uint64_t kv_bytes, std::string* why, int wait_ms) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::milliseconds(std::max(0, wait_ms));
  std::unique_lock<std::mutex> lock(mu_);
  bool waited = false;
  for (;;) {
    if (pages >= 0 && reserved_bytes_ + kv_bytes <= capacity_) {
      reserved_pages_ += pages;
      reserved_bytes_ += kv_bytes;
      return true;
    }
    // Live reservations alone (draining <= reserved) leave no room: waiting cannot help.
    const bool fits_after_drain =
        pages >= 0 && reserved_bytes_ - draining_bytes_ + kv_bytes <= capacity_;
    if (!fits_after_drain || Clock::now() >= deadline) break;
    waited = true;
    drained_.wait_until(lock, deadline);
  }
  if (why) {
    *why = "KV needs " + std::to_string(kv_bytes) + " bytes, " +
           std::to_string(capacity_ - std::min(reserved_bytes_, capacity_)) + " of " +
           std::to_string(capacity_) + " bytes are free";
    if (waited) {
      const auto ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
      *why += " after waiting " + std::to_string(ms) + " ms for released jobs' pages (" +
              std::to_string(draining_bytes_) + " bytes still draining)";
    } else if (draining_bytes_ > 0) {
      *why += " (" + std::to_string(draining_bytes_) + " bytes of released jobs still draining)";
    }
  }
  return false;
}

void PagePool::unreserve(int64_t pages, uint64_t kv_bytes, bool draining) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    reserved_pages_ -= pages;
    reserved_bytes_ -= kv_bytes;
    if (draining) draining_bytes_ -= kv_bytes;
  }
  drained_.notify_all();
}

void PagePool::retire(uint64_t kv_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  draining_bytes_ += kv_bytes;
}

uint64_t PagePool::draining_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return draining_bytes_;
}

uint64_t PagePool::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_bytes_;
}

std::unique_ptr<char[]> PagePool::take() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      auto p = std::move(free_.back());
      free_.pop_back();
      return p;
    }
  }
  return std::unique_ptr<char[]>(new char[shape_.page_bytes()]);
}

void PagePool::give(std::unique_ptr<char[]> page) {
  if (!page) return;
  std::lock_guard<std::mutex> lock(mu_);
  // A few buffers wait for the next pages; the rest go back to the allocator at once (a
  // decoding job releases its pages layer by layer while its KvCache fills).
  if (free_.size() < kKeepFreePages) free_.push_back(std::move(page));
}

// ---- JobKvStore -------------------------------------------------------------------

JobKvStore::JobKvStore(PagePool* pool, int64_t n_tokens, int wait_ms)
    : pool_(pool), shape_(pool->shape()), n_tokens_(n_tokens) {
  if (n_tokens < 1)
    throw PageError("job KV store: prompt tokens must be >= 1, got " + std::to_string(n_tokens));
  n_blocks_ = (n_tokens + shape_.page_tokens - 1) / shape_.page_tokens;
  pages_reserved_ = shape_.pages_for(n_tokens);
  bytes_reserved_ = shape_.kv_bytes(n_tokens);
  std::string why;
  if (!pool_->reserve(pages_reserved_, bytes_reserved_, &why, wait_ms))
    throw PageError("decoder KV store full: " + std::to_string(n_tokens) + " tokens x " +
                    std::to_string(shape_.kv_bytes(1)) + " bytes per token (2 x " +
                    std::to_string(shape_.n_layers) + " layers x " +
                    std::to_string(shape_.kv_dim()) + " x " + to_string(shape_.dtype) +
                    "): " + why);
  layers_.resize(shape_.n_layers);
  for (Layer& L : layers_) {
    L.pages.resize(n_blocks_);
    L.received.resize(shape_.n_kv_heads);
  }
}

JobKvStore::~JobKvStore() {
  for (int l = 0; l < shape_.n_layers; ++l) release_layer(l);
  pool_->unreserve(pages_reserved_, bytes_reserved_, retired_.load());
}

void JobKvStore::retire() {
  if (!retired_.exchange(true)) pool_->retire(bytes_reserved_);
}

void JobKvStore::check_geometry(const PageIn& p) const {
  const std::string where = "KV page layer " + std::to_string(p.layer) + " tokens " +
                            range_str(p.token_begin, p.token_end) + ": ";
  if (p.layer < 0 || p.layer >= shape_.n_layers)
    throw PageError(where + "layer out of [0, " + std::to_string(shape_.n_layers) + ")");
  if (p.kv_heads.empty()) throw PageError(where + "no KV heads");
  for (size_t i = 0; i < p.kv_heads.size(); ++i) {
    const int h = p.kv_heads[i];
    if (h < 0 || h >= shape_.n_kv_heads || (i > 0 && h <= p.kv_heads[i - 1]))
      throw PageError(where + "KV heads must be ascending ids in [0, " +
                      std::to_string(shape_.n_kv_heads) + "), got " + std::to_string(h) + " at " +
                      std::to_string(i));
  }
  if (p.token_begin < 0 || p.token_end <= p.token_begin || p.token_end > n_tokens_)
    throw PageError(where + "range outside the job's " + std::to_string(n_tokens_) + " tokens");
  const int P = shape_.page_tokens;
  if (p.token_begin / P != (p.token_end - 1) / P)
    throw PageError(where + "spans two " + std::to_string(P) + "-token pages");
  if (p.head_dim != shape_.head_dim)
    throw PageError(where + "head_dim " + std::to_string(p.head_dim) + ", contract says " +
                    std::to_string(shape_.head_dim));
  if (p.dtype != DType::kF32 && p.dtype != DType::kBF16)
    throw PageError(where + "dtype " + to_string(p.dtype) + " is not f32 or bf16");
}

void JobKvStore::check_page(const PageIn& p) const {
  check_geometry(p);
  const std::string where = "KV page layer " + std::to_string(p.layer) + " tokens " +
                            range_str(p.token_begin, p.token_end) + ": ";
  const size_t want = static_cast<size_t>(p.token_end - p.token_begin) * p.kv_heads.size() *
                      p.head_dim * dtype_size(p.dtype);
  if (p.k_bytes != want || p.v_bytes != want || !p.k || !p.v)
    throw PageError(where + "K / V hold " + std::to_string(p.k_bytes) + " / " +
                    std::to_string(p.v_bytes) + " bytes, expected " + std::to_string(want));
  const uint32_t crc = crc32c(p.v, p.v_bytes, crc32c(p.k, p.k_bytes));
  if (crc != p.crc32c)
    throw PageError(where + "checksum mismatch (crc32c " + std::to_string(crc) + ", header says " +
                    std::to_string(p.crc32c) + ")");
}

void JobKvStore::check_overlap_locked(const Layer& L, const PageIn& p) const {
  if (L.released)
    throw PageError("KV page for layer " + std::to_string(p.layer) + " after it was released");
  for (int h : p.kv_heads) {
    const auto& m = L.received[h];
    auto it = m.upper_bound(p.token_begin);  // first interval starting after begin
    const bool hit_next = it != m.end() && it->first < p.token_end;
    const bool hit_prev = it != m.begin() && std::prev(it)->second > p.token_begin;
    if (hit_next || hit_prev)
      throw PageError("KV page layer " + std::to_string(p.layer) + " head " + std::to_string(h) +
                      " tokens " + range_str(p.token_begin, p.token_end) +
                      " overlaps tokens already received");
  }
}

bool JobKvStore::mark(const PageIn& p) {
  check_geometry(p);
  std::lock_guard<std::mutex> lock(mu_);
  Layer& L = layers_[p.layer];
  check_overlap_locked(L, p);
  bytes_ += 2 * static_cast<uint64_t>(p.token_end - p.token_begin) * p.kv_heads.size() *
            p.head_dim * dtype_size(p.dtype);
  record_locked(L, p);
  return report_locked(L);
}

bool JobKvStore::put(const PageIn& p) {
  check_page(p);  // checksum outside the lock: receivers of one job run in parallel
  const int P = shape_.page_tokens;
  const int64_t kvh = shape_.n_kv_heads, hd = shape_.head_dim, nh = p.kv_heads.size();
  const int64_t block = p.token_begin / P;
  const int64_t esz = shape_.elem_bytes();
  char *pk = nullptr, *pv = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Layer& L = layers_[p.layer];
    check_overlap_locked(L, p);
    auto& page = L.pages[block];
    if (!page) page = pool_->take();
    pk = page.get();
    pv = page.get() + shape_.page_elems() * esz;
    record_locked(L, p);  // the cells are this put's: an overlapping page is refused now
    ++L.inflight;
  }
  // The bytes, outside the lock (disjoint cells of the page; the layer is not complete,
  // exported or released while inflight > 0).
  const int64_t rows = p.token_end - p.token_begin;
  const int64_t r0 = p.token_begin - block * P;
  if (p.dtype == shape_.dtype && nh == kvh) {  // the common case: one copy, bytes as sent
    const size_t n = static_cast<size_t>(rows * kvh * hd * esz);
    std::memcpy(pk + r0 * kvh * hd * esz, p.k, n);
    std::memcpy(pv + r0 * kvh * hd * esz, p.v, n);
  } else {
    // A subset of heads, or another dtype (bf16 pages of an NCCL sender into an fp32
    // store: widened exactly; fp32 into bf16: rounded to nearest even).
    const int64_t in_esz = dtype_size(p.dtype);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t dst = ((r0 + r) * kvh + p.kv_heads[j]) * hd;
        const int64_t src = (r * nh + j) * hd;
        const char* ks = static_cast<const char*>(p.k) + src * in_esz;
        const char* vs = static_cast<const char*>(p.v) + src * in_esz;
        if (p.dtype == shape_.dtype) {
          std::memcpy(pk + dst * esz, ks, hd * esz);
          std::memcpy(pv + dst * esz, vs, hd * esz);
        } else {
          convert_row(p.dtype, ks, pk + dst * esz, hd);
          convert_row(p.dtype, vs, pv + dst * esz, hd);
        }
      }
  }
  std::lock_guard<std::mutex> lock(mu_);
  Layer& L = layers_[p.layer];
  bytes_ += p.k_bytes + p.v_bytes;
  if (--L.inflight == 0) idle_.notify_all();
  return report_locked(L);
}

void JobKvStore::record_locked(Layer& L, const PageIn& p) {
  const int64_t rows = p.token_end - p.token_begin, nh = p.kv_heads.size();
  for (int h : p.kv_heads) {
    auto& m = L.received[h];
    // Insert and merge with touching neighbours so the map stays small.
    int64_t b = p.token_begin, e = p.token_end;
    auto it = m.lower_bound(b);
    if (it != m.begin() && std::prev(it)->second == b) {
      --it;
      b = it->first;
      it = m.erase(it);
    }
    if (it != m.end() && it->first == e) {
      e = it->second;
      m.erase(it);
    }
    m.emplace(b, e);
  }
  L.cells += rows * nh;
}

bool JobKvStore::complete_locked(const Layer& L) const {
  return L.cells == n_tokens_ * shape_.n_kv_heads && L.inflight == 0;
}

bool JobKvStore::report_locked(Layer& L) {
  if (L.reported || !complete_locked(L)) return false;
  L.reported = true;
  return true;
}

bool JobKvStore::layer_complete(int layer) const {
  std::lock_guard<std::mutex> lock(mu_);
  return complete_locked(layers_.at(layer));
}

int JobKvStore::layers_complete() const {
  std::lock_guard<std::mutex> lock(mu_);
  int n = 0;
  for (const Layer& L : layers_) n += complete_locked(L);
  return n;
}

bool JobKvStore::complete() const { return layers_complete() == shape_.n_layers; }

uint64_t JobKvStore::bytes_received() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_;
}

void JobKvStore::export_layer(int layer, void* k_out, void* v_out) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Layer& L = layers_.at(layer);
  if (L.released || !complete_locked(L))
    throw PageError("KV layer " + std::to_string(layer) + " is not complete");
  const int64_t P = shape_.page_tokens, row = shape_.kv_dim() * shape_.elem_bytes();
  char* ko = static_cast<char*>(k_out);
  char* vo = static_cast<char*>(v_out);
  for (int64_t b = 0; b < n_blocks_; ++b) {
    const int64_t rows = std::min(P, n_tokens_ - b * P);
    const char* page = L.pages[b].get();
    std::memcpy(ko + b * P * row, page, rows * row);
    std::memcpy(vo + b * P * row, page + P * row, rows * row);
  }
}

void JobKvStore::release_layer(int layer) {
  std::unique_lock<std::mutex> lock(mu_);
  Layer& L = layers_.at(layer);
  // A put still copying into the layer's pages (a job released mid-transfer) ends first:
  // a bounded wait (one page's memcpy), never a buffer freed under a writer.
  idle_.wait(lock, [&] { return L.inflight == 0; });
  for (auto& p : L.pages) pool_->give(std::move(p));
  L.pages.clear();
  L.released = true;
}

}  // namespace mprefill::kv
