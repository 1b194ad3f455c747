// GPU index estimation and index build (kernels/cuda/index/index.h) against the CPU
// reference (kernels/cpu/cpu.h):
//   - index build from random selections at awkward N equals cpu::vs_build_index exactly;
//   - vs_select on identical scores (with exact ties, NaN, +inf) equals cpu::vs_select;
//   - estimation scores within tolerance of cpu::vs_row_stats / vs_scores run on the same
//     bf16-rounded values in fp32; selections equal up to near-ties;
//   - planted columns / diagonals are found; a 3-shard run equals the unsharded one;
//   - block-sparse estimation equals cpu::block_sparse_estimate (planted and random).
// Outputs are poisoned before each run and checked to be fully written.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/index/index.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

using cuda::last_error;
namespace gi = cuda::index;

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call
#define ST_OK(call) ASSERT_EQ((call), Status::kOk) << #call << ": " << last_error()

// Untyped device buffer.
class DBuf {
 public:
  DBuf() = default;
  explicit DBuf(size_t bytes) { alloc(bytes); }
  ~DBuf() { cudaFree(p_); }
  DBuf(const DBuf&) = delete;
  DBuf& operator=(const DBuf&) = delete;
  void alloc(size_t bytes) {
    cudaFree(p_);
    p_ = nullptr;
    bytes_ = std::max<size_t>(bytes, 16);
    if (cudaMalloc(&p_, bytes_) != cudaSuccess) p_ = nullptr;
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }
  template <typename T>
  cudaError_t up(const std::vector<T>& v) {
    return cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  template <typename T>
  cudaError_t down(std::vector<T>* v, size_t n) const {
    v->resize(n);
    return cudaMemcpy(v->data(), p_, n * sizeof(T), cudaMemcpyDeviceToHost);
  }
  cudaError_t poison() { return cudaMemset(p_, 0xff, bytes_); }
  cudaError_t zero() { return cudaMemset(p_, 0, bytes_); }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

bool gpu_present() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return false;
  }
  return true;
}

class GpuIndex : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_present()) {
      if (std::getenv("MPREFILL_REQUIRE_GPU"))
        FAIL() << "MPREFILL_REQUIRE_GPU is set but no CUDA device is usable";
      GTEST_SKIP() << "no CUDA device: skipping";
    }
  }
};

// ---------------------------------------------------------------- selections on device
struct DevSel {
  DBuf cols, offs, ncols, noffs;
  gi::VsSelectionsDevice view;
};

void upload_selections(const std::vector<VsSelection>& heads, int64_t n, DevSel* d) {
  const int H = static_cast<int>(heads.size());
  int cc = 1, oc = 1;
  for (const auto& s : heads) {
    cc = std::max<int>(cc, s.columns.size());
    oc = std::max<int>(oc, s.offsets.size());
  }
  std::vector<int> cols(static_cast<size_t>(H) * cc, -7), offs(static_cast<size_t>(H) * oc, -7);
  std::vector<int> nc(H), no(H);
  for (int h = 0; h < H; ++h) {
    std::copy(heads[h].columns.begin(), heads[h].columns.end(), cols.begin() + h * cc);
    std::copy(heads[h].offsets.begin(), heads[h].offsets.end(), offs.begin() + h * oc);
    nc[h] = heads[h].columns.size();
    no[h] = heads[h].offsets.size();
  }
  d->cols.alloc(cols.size() * 4);
  d->offs.alloc(offs.size() * 4);
  d->ncols.alloc(H * 4);
  d->noffs.alloc(H * 4);
  d->cols.up(cols);
  d->offs.up(offs);
  d->ncols.up(nc);
  d->noffs.up(no);
  d->view.seq_len = n;
  d->view.num_heads = H;
  d->view.columns = d->cols.get<int>();
  d->view.offsets = d->offs.get<int>();
  d->view.n_columns = d->ncols.get<int>();
  d->view.n_offsets = d->noffs.get<int>();
  d->view.col_capacity = cc;
  d->view.off_capacity = oc;
}

std::vector<VsSelection> download_selections(const gi::VsSelectionsDevice& v) {
  std::vector<int> cols, offs, nc, no;
  auto get = [](const void* p, size_t n, std::vector<int>* out) {
    out->resize(n);
    cudaMemcpy(out->data(), p, n * 4, cudaMemcpyDeviceToHost);
  };
  get(v.columns, static_cast<size_t>(v.num_heads) * v.col_capacity, &cols);
  get(v.offsets, static_cast<size_t>(v.num_heads) * v.off_capacity, &offs);
  get(v.n_columns, v.num_heads, &nc);
  get(v.n_offsets, v.num_heads, &no);
  std::vector<VsSelection> out(v.num_heads);
  for (int h = 0; h < v.num_heads; ++h) {
    const int a = std::clamp(nc[h], 0, v.col_capacity), b = std::clamp(no[h], 0, v.off_capacity);
    out[h].columns.assign(cols.begin() + h * v.col_capacity, cols.begin() + h * v.col_capacity + a);
    out[h].offsets.assign(offs.begin() + h * v.off_capacity, offs.begin() + h * v.off_capacity + b);
  }
  return out;
}

// GPU index of device selections, downloaded.
void gpu_build(const gi::VsSelectionsDevice& sel, VsIndex* out) {
  const int H = sel.num_heads;
  const int64_t nb = num_blocks(sel.seq_len);
  DBuf ws(gi::vs_index_workspace_size(H, sel.seq_len, sel.off_capacity));
  DBuf rp((H * nb + 1) * 8), cp((H * nb + 1) * 8);
  ASSERT_EQ(rp.poison(), cudaSuccess);
  ASSERT_EQ(cp.poison(), cudaSuccess);
  ST_OK(gi::vs_index_count(sel, rp.get<int64_t>(), cp.get<int64_t>(), ws.get(), ws.bytes(), 0));
  CUDA_OK(cudaDeviceSynchronize());
  out->seq_len = sel.seq_len;
  out->num_heads = H;
  out->nblocks = nb;
  CUDA_OK(rp.down(&out->range_ptr, H * nb + 1));
  CUDA_OK(cp.down(&out->col_ptr, H * nb + 1));
  const int64_t nr = out->range_ptr.back(), nc = out->col_ptr.back();
  ASSERT_GE(nr, 0);
  ASSERT_GE(nc, 0);
  DBuf lo(nr * 4 + 64), hi(nr * 4 + 64), col(nc * 4 + 64);
  // poison: 0xff.. = -1, never a valid value; the 64 guard bytes must stay poisoned
  ASSERT_EQ(lo.poison(), cudaSuccess);
  ASSERT_EQ(hi.poison(), cudaSuccess);
  ASSERT_EQ(col.poison(), cudaSuccess);
  ST_OK(gi::vs_index_fill(sel, rp.get<int64_t>(), cp.get<int64_t>(), lo.get<int>(), hi.get<int>(),
                          col.get<int>(), ws.get(), ws.bytes(), 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<int> l, h, c;
  CUDA_OK(lo.down(&l, nr + 16));
  CUDA_OK(hi.down(&h, nr + 16));
  CUDA_OK(col.down(&c, nc + 16));
  for (int i = 0; i < 16; ++i) {
    ASSERT_EQ(l[nr + i], -1) << "range_lo written past its end";
    ASSERT_EQ(h[nr + i], -1) << "range_hi written past its end";
    ASSERT_EQ(c[nc + i], -1) << "col written past its end";
  }
  l.resize(nr);
  h.resize(nr);
  c.resize(nc);
  out->range_lo = l;
  out->range_hi = h;
  out->col = c;
}

void expect_index_equal(const VsIndex& cpu, const VsIndex& gpu, const std::string& what) {
  ASSERT_EQ(cpu.nblocks, gpu.nblocks) << what;
  ASSERT_EQ(cpu.range_ptr.size(), gpu.range_ptr.size()) << what;
  for (size_t i = 0; i < cpu.range_ptr.size(); ++i) {
    ASSERT_EQ(cpu.range_ptr[i], gpu.range_ptr[i]) << what << ": range_ptr[" << i << "]";
    ASSERT_EQ(cpu.col_ptr[i], gpu.col_ptr[i]) << what << ": col_ptr[" << i << "]";
  }
  ASSERT_EQ(cpu.range_lo.size(), gpu.range_lo.size()) << what;
  for (size_t i = 0; i < cpu.range_lo.size(); ++i) {
    ASSERT_EQ(cpu.range_lo[i], gpu.range_lo[i]) << what << ": range_lo[" << i << "]";
    ASSERT_EQ(cpu.range_hi[i], gpu.range_hi[i]) << what << ": range_hi[" << i << "]";
  }
  ASSERT_EQ(cpu.col.size(), gpu.col.size()) << what;
  for (size_t i = 0; i < cpu.col.size(); ++i)
    ASSERT_EQ(cpu.col[i], gpu.col[i]) << what << ": col[" << i << "]";
}

// A random valid selection: forced columns 0..29 / offsets 0..99 (as estimation gives),
// then `mode` 0 uniform, 1 clustered near the diagonal, 2 dense runs.
VsSelection random_selection(int64_t n, int v, int s, int mode, std::mt19937_64& rng) {
  v = clamp_vertical_budget(v, n);
  s = clamp_slash_budget(s, n);
  std::set<int> cols, offs;
  for (int c = 0; c < kForcedColumns && c < n && static_cast<int>(cols.size()) < v; ++c)
    cols.insert(c);
  std::uniform_int_distribution<int64_t> any(0, n - 1);
  while (static_cast<int>(cols.size()) < v) cols.insert(static_cast<int>(any(rng)));
  for (int d = 0; d < kForcedOffsets && d < n && static_cast<int>(offs.size()) < s; ++d)
    offs.insert(d);
  std::exponential_distribution<double> ex(1.0 / 300);
  int guard = 0;
  while (static_cast<int>(offs.size()) < s && guard++ < 100000) {
    int64_t d;
    if (mode == 0) {
      d = any(rng);
    } else if (mode == 1) {
      d = 100 + static_cast<int64_t>(ex(rng));
    } else {
      d = (any(rng) / 97) * 97 + static_cast<int64_t>(rng() % 40);
    }
    if (d < n) offs.insert(static_cast<int>(d));
  }
  for (int64_t d = 0; static_cast<int>(offs.size()) < s; ++d) offs.insert(static_cast<int>(d));
  VsSelection r;
  r.columns.assign(cols.begin(), cols.end());
  r.offsets.assign(offs.rbegin(), offs.rend());
  return r;
}

TEST_F(GpuIndex, BuildEqualsCpuAtAwkwardSizes) {
  std::mt19937_64 rng(20261126);
  for (int64_t n : {1, 63, 64, 65, 1000, 4099, 70000}) {
    std::vector<VsSelection> heads;
    const int budgets[][2] = {{1000, 6096}, {3500, 100}, {30, 50}, {200, 700}, {1 << 30, 1 << 30}};
    int i = 0;
    for (auto& b : budgets) {
      if (b[0] == (1 << 30) && n > 5000) continue;  // full budgets only where cheap on the CPU
      heads.push_back(random_selection(n, b[0], b[1], i++ % 3, rng));
    }
    heads.push_back(random_selection(n, 40, 300, 1, rng));
    heads.push_back(random_selection(n, 40, 300, 2, rng));
    const VsIndex cpu = cpu::vs_build_index(heads, n);
    DevSel d;
    upload_selections(heads, n, &d);
    VsIndex gpu;
    ASSERT_NO_FATAL_FAILURE(gpu_build(d.view, &gpu));
    ASSERT_NO_FATAL_FAILURE(expect_index_equal(cpu, gpu, "N=" + std::to_string(n)));
  }
}

// Offsets that skip 0 or are sparse near the top: the builder's definition holds for any
// sorted distinct selection.
TEST_F(GpuIndex, BuildEqualsCpuOnArbitrarySelections) {
  std::mt19937_64 rng(7);
  for (int64_t n : {2, 129, 777, 5000}) {
    for (int trial = 0; trial < 6; ++trial) {
      std::vector<VsSelection> heads(3);
      for (auto& s : heads) {
        std::set<int> c, o;
        const int nv = 1 + rng() % std::min<int64_t>(n, 90),
                  ns = 1 + rng() % std::min<int64_t>(n, 120);
        while (static_cast<int>(c.size()) < nv) c.insert(rng() % n);
        while (static_cast<int>(o.size()) < ns) o.insert(rng() % n);
        s.columns.assign(c.begin(), c.end());
        s.offsets.assign(o.rbegin(), o.rend());
      }
      const VsIndex cpu = cpu::vs_build_index(heads, n);
      DevSel d;
      upload_selections(heads, n, &d);
      VsIndex gpu;
      ASSERT_NO_FATAL_FAILURE(gpu_build(d.view, &gpu));
      ASSERT_NO_FATAL_FAILURE(expect_index_equal(cpu, gpu, "N=" + std::to_string(n)));
    }
  }
}

// ---------------------------------------------------------------- top-k selection
void run_gpu_select(const std::vector<float>& col, const std::vector<float>& slash, int H,
                    int64_t n, const std::vector<int>& vb, const std::vector<int>& sb,
                    std::vector<VsSelection>* out, const std::vector<double>& tau = {}) {
  DBuf dc(col.size() * 4), ds(slash.size() * 4);
  CUDA_OK(dc.up(col));
  CUDA_OK(ds.up(slash));
  int cc = 1, oc = 1;
  for (int h = 0; h < H; ++h) {
    cc = std::max(cc, clamp_vertical_budget(vb[h], n));
    oc = std::max(oc, clamp_slash_budget(sb[h], n));
  }
  DBuf cols(static_cast<size_t>(H) * cc * 4), offs(static_cast<size_t>(H) * oc * 4), nc(H * 4),
      no(H * 4);
  CUDA_OK(cols.poison());
  CUDA_OK(offs.poison());
  CUDA_OK(nc.poison());
  CUDA_OK(no.poison());
  gi::VsSelectionsDevice sel;
  sel.seq_len = n;
  sel.num_heads = H;
  sel.columns = cols.get<int>();
  sel.offsets = offs.get<int>();
  sel.n_columns = nc.get<int>();
  sel.n_offsets = no.get<int>();
  sel.col_capacity = cc;
  sel.off_capacity = oc;
  DBuf ws(gi::vs_select_workspace_size(H, n));
  ST_OK(gi::vs_select(dc.get<float>(), ds.get<float>(), vb.data(), sb.data(), &sel, ws.get(),
                      ws.bytes(), 0, tau.empty() ? nullptr : tau.data()));
  CUDA_OK(cudaDeviceSynchronize());
  *out = download_selections(sel);
  for (int h = 0; h < H; ++h) {
    if (!tau.empty() && tau[h] > 0) {  // adaptive: the budget is a cap
      ASSERT_LE(static_cast<int>((*out)[h].columns.size()), clamp_vertical_budget(vb[h], n));
      ASSERT_LE(static_cast<int>((*out)[h].offsets.size()), clamp_slash_budget(sb[h], n));
      continue;
    }
    ASSERT_EQ(static_cast<int>((*out)[h].columns.size()), clamp_vertical_budget(vb[h], n));
    ASSERT_EQ(static_cast<int>((*out)[h].offsets.size()), clamp_slash_budget(sb[h], n));
  }
}

// An adaptive segment against cpu::select_by_mass: the GPU set must be a prefix of the
// CPU's ranking, and of the CPU's length unless the goal sits within fp64 rounding of the
// boundary (the GPU sums per-digit bins in another order), then one entry either way.
void expect_mass_cut(const float* score, int64_t n, int forced, int cap, double tau,
                     std::vector<int> got, bool descending, const std::string& what) {
  const std::vector<int> order = cpu::rank_indices(score, n, 0, forced, cap);
  const int64_t n_forced = std::min<int64_t>({forced, n, static_cast<int64_t>(order.size())});
  const int64_t want = cpu::mass_prefix(order, n_forced, score, n, tau);
  const int64_t k = static_cast<int64_t>(got.size());
  std::vector<int> prefix(order.begin(), order.begin() + std::min<int64_t>(k, order.size()));
  std::sort(prefix.begin(), prefix.end());
  if (descending) std::reverse(prefix.begin(), prefix.end());
  ASSERT_EQ(prefix, got) << what << ": not a prefix of the ranking (k " << k << ")";
  if (k == want) return;
  ASSERT_LE(std::abs(k - want), 1) << what << ": k " << k << " vs cpu " << want;
  double total = 0, cum = 0;
  for (int64_t i = 0; i < n; ++i)
    if (std::isfinite(score[i]) && score[i] > 0) total += score[i];
  for (int64_t i = 0; i < std::min(k, want); ++i)
    if (std::isfinite(score[order[i]]) && score[order[i]] > 0) cum += score[order[i]];
  EXPECT_NEAR(cum / (tau * total), 1.0, 1e-9)
      << what << ": k " << k << " vs cpu " << want << " away from the rounding boundary";
}

TEST_F(GpuIndex, AdaptiveSelectIsTheCpuMassCut) {
  std::mt19937_64 rng(4242);
  std::lognormal_distribution<float> heavy(0.f, 2.5f);  // a few heads of mass, a long tail
  int exact = 0, total_segments = 0;
  for (int64_t n : {1, 31, 101, 4099, 70001, 300000}) {
    const int H = 4;
    std::vector<float> col(H * n), slash(H * n);
    for (int h = 0; h < H; ++h)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = rng() % 1000;
        // head 3: few distinct values (exact ties at the cut); zeros, negatives, NaN
        float a = h == 3 ? static_cast<float>(rng() % 6) * 0.125f : heavy(rng);
        float b = h == 3 ? static_cast<float>(rng() % 4) : heavy(rng) * 1e-3f;
        if (r == 0) a = std::numeric_limits<float>::quiet_NaN();
        if (r == 1) b = 0.f;
        if (r == 2) a = -2.f;
        col[h * n + i] = a;
        slash[h * n + i] = b;
      }
    const std::vector<int> vb = {1000, 3500, 1 << 30, 200}, sb = {6096, 100, 1 << 30, 500};
    const std::vector<double> tau = {0.9, 0.5, 1.0, 0.95};
    std::vector<VsSelection> gpu;
    ASSERT_NO_FATAL_FAILURE(run_gpu_select(col, slash, H, n, vb, sb, &gpu, tau));
    for (int h = 0; h < H; ++h) {
      const std::string what = "N=" + std::to_string(n) + " head " + std::to_string(h);
      ASSERT_NO_FATAL_FAILURE(expect_mass_cut(col.data() + h * n, n, kForcedColumns,
                                              clamp_vertical_budget(vb[h], n), tau[h],
                                              gpu[h].columns, false, what + " columns"));
      ASSERT_NO_FATAL_FAILURE(expect_mass_cut(slash.data() + h * n, n, kForcedOffsets,
                                              clamp_slash_budget(sb[h], n), tau[h], gpu[h].offsets,
                                              true, what + " offsets"));
      const VsSelection ref =
          cpu::vs_select(col.data() + h * n, slash.data() + h * n, n, vb[h], sb[h], tau[h]);
      exact += (ref.columns == gpu[h].columns) + (ref.offsets == gpu[h].offsets);
      total_segments += 2;
    }
  }
  // The rounding case is rare: most segments must match the CPU exactly.
  EXPECT_GE(exact, total_segments - 2) << exact << " of " << total_segments << " exact";
  std::printf("adaptive select: %d of %d segments equal to the CPU's\n", exact, total_segments);
}

// A head with tau mixes with fixed-budget heads in one call; tau out of (0, 1] is refused.
TEST_F(GpuIndex, AdaptiveSelectMixesWithFixedHeadsAndRejectsBadTau) {
  std::mt19937_64 rng(5);
  std::lognormal_distribution<float> heavy(0.f, 2.f);
  const int64_t n = 5000;
  const int H = 2;
  std::vector<float> col(H * n), slash(H * n);
  for (auto& x : col) x = heavy(rng);
  for (auto& x : slash) x = heavy(rng);
  // Head 1's columns: 52 planted columns of mass 100 (every 97th), the rest 0.01: tau 0.8
  // keeps the 30 forced ones and about 41 planted ones, far below the cap of 300.
  for (int64_t i = 0; i < n; ++i) col[n + i] = i % 97 == 5 ? 100.f : 0.01f;
  const std::vector<int> vb = {300, 300}, sb = {400, 400};
  std::vector<VsSelection> gpu;
  ASSERT_NO_FATAL_FAILURE(run_gpu_select(col, slash, H, n, vb, sb, &gpu, {0.0, 0.8}));
  const VsSelection fixed = cpu::vs_select(col.data(), slash.data(), n, vb[0], sb[0]);
  EXPECT_EQ(fixed.columns, gpu[0].columns);
  EXPECT_EQ(fixed.offsets, gpu[0].offsets);
  const VsSelection ref = cpu::vs_select(col.data() + n, slash.data() + n, n, vb[1], sb[1], 0.8);
  EXPECT_EQ(ref.columns, gpu[1].columns);
  EXPECT_EQ(ref.offsets, gpu[1].offsets);
  EXPECT_GT(gpu[1].columns.size(), 60u);
  EXPECT_LT(gpu[1].columns.size(), 80u) << "tau 0.8 keeps the forced and most planted columns";
  gi::VsSelectionsDevice sel;
  sel.seq_len = n;
  sel.num_heads = 1;
  DBuf dc(n * 4), buf(4096 * 4), cnt(4);
  sel.columns = sel.offsets = buf.get<int>();
  sel.n_columns = sel.n_offsets = cnt.get<int>();
  sel.col_capacity = sel.off_capacity = 4096;
  DBuf ws(gi::vs_select_workspace_size(1, n));
  for (double bad : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    EXPECT_EQ(gi::vs_select(dc.get<float>(), dc.get<float>(), vb.data(), sb.data(), &sel, ws.get(),
                            ws.bytes(), 0, &bad),
              Status::kInvalidArgument)
        << "tau " << bad;
  }
}

TEST_F(GpuIndex, SelectEqualsCpuOnIdenticalScoresWithTies) {
  std::mt19937_64 rng(99);
  for (int64_t n : {1, 30, 64, 101, 1000, 4099, 70000, 300000}) {
    const int H = 3;
    std::vector<float> col(H * n), slash(H * n);
    for (int h = 0; h < H; ++h) {
      for (int64_t i = 0; i < n; ++i) {
        // few distinct values -> many exact ties; a NaN, -0, +inf and negatives sprinkled
        const int64_t r = rng() % 1000;
        float a = h == 0 ? static_cast<float>(rng() % 7) * 0.25f
                         : std::ldexp(static_cast<float>(rng() % 100000), -20);
        float b = h == 1 ? static_cast<float>(rng() % 5)
                         : std::ldexp(static_cast<float>(rng() % 3000), -12);
        if (r == 0) a = std::numeric_limits<float>::quiet_NaN();
        if (r == 1) b = std::numeric_limits<float>::infinity();
        if (r == 2) a = -0.f;
        if (r == 3) b = -1.5f;
        col[h * n + i] = a;
        slash[h * n + i] = b;
      }
    }
    const std::vector<int> vb = {1000, 3500, 1 << 30}, sb = {6096, 100, 20};
    std::vector<VsSelection> gpu;
    ASSERT_NO_FATAL_FAILURE(run_gpu_select(col, slash, H, n, vb, sb, &gpu));
    for (int h = 0; h < H; ++h) {
      const VsSelection ref =
          cpu::vs_select(col.data() + h * n, slash.data() + h * n, n, vb[h], sb[h]);
      ASSERT_EQ(ref.columns, gpu[h].columns) << "N=" << n << " head " << h;
      ASSERT_EQ(ref.offsets, gpu[h].offsets) << "N=" << n << " head " << h;
    }
  }
}

// ---------------------------------------------------------------- estimation
struct EstData {
  int64_t n;
  int H, Hkv, d;
  std::vector<float> q_last, k;  // bf16-rounded values: q [n_last][H][d], k [n][Hkv][d]
};

EstData random_est(int64_t n, int H, int Hkv, int d, uint64_t seed) {
  EstData e{n, H, Hkv, d, {}, {}};
  const int nl = static_cast<int>(std::min<int64_t>(64, n));
  e.q_last = test::random_normal(static_cast<size_t>(nl) * H * d, seed, 1.f);
  e.k = test::random_normal(static_cast<size_t>(n) * Hkv * d, seed + 1, 1.f);
  for (float& x : e.q_last) x = bf16_to_f32(f32_to_bf16(x));
  for (float& x : e.k) x = bf16_to_f32(f32_to_bf16(x));
  return e;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(v[i]);
  return b;
}

VsEstimateParams est_params(const EstData& e, const void* q, const void* k, int64_t k_pos0, int n_k,
                            DType dt) {
  VsEstimateParams p;
  p.q_last = q;
  p.k = k;
  p.q_row_stride = static_cast<int64_t>(e.H) * e.d;
  p.q_head_stride = e.d;
  p.k_row_stride = static_cast<int64_t>(e.Hkv) * e.d;
  p.k_head_stride = e.d;
  p.n_last = static_cast<int>(std::min<int64_t>(64, e.n));
  p.seq_len = e.n;
  p.n_k = n_k;
  p.k_pos0 = k_pos0;
  p.num_heads = e.H;
  p.num_kv_heads = e.Hkv;
  p.head_dim = e.d;
  p.scale = 1.f / std::sqrt(static_cast<float>(e.d));
  p.dtype = dt;
  return p;
}

struct Scores {
  RowStats stats;
  std::vector<float> col, slash;  // [H][n]
};

void cpu_scores(const EstData& e, Scores* s) {
  const VsEstimateParams p = est_params(e, e.q_last.data(), e.k.data(), 0, e.n, DType::kF32);
  ST_OK(cpu::vs_row_stats(p, &s->stats));
  s->col.assign(static_cast<size_t>(e.H) * e.n, 0.f);
  s->slash.assign(static_cast<size_t>(e.H) * e.n, 0.f);
  ST_OK(cpu::vs_scores(p, s->stats, s->col.data(), s->slash.data()));
}

// GPU passes over key shards [bounds[i], bounds[i+1]); statistics combined on the host
// (cpu::combine_row_stats) or, with device_combine, by vs_combine_row_stats.
void gpu_scores(const EstData& e, const std::vector<int64_t>& bounds, bool device_combine,
                Scores* s) {
  const auto qb = to_bf16(e.q_last), kb = to_bf16(e.k);
  DBuf dq(qb.size() * 2), dk(kb.size() * 2);
  CUDA_OK(dq.up(qb));
  CUDA_OK(dk.up(kb));
  const int nl = static_cast<int>(std::min<int64_t>(64, e.n));
  const size_t rows = static_cast<size_t>(e.H) * nl;
  DBuf mx(rows * 4), sm(rows * 4), gmx(rows * 4), gsm(rows * 4);
  RowStats combined;
  const size_t nsh = bounds.size() - 1;
  for (size_t i = 0; i < nsh; ++i) {
    const int64_t k0 = bounds[i];
    const int nk = static_cast<int>(bounds[i + 1] - k0);
    const auto* kp = dk.get<uint16_t>() + k0 * e.Hkv * e.d;
    const VsEstimateParams p = est_params(e, dq.get(), kp, k0, nk, DType::kBF16);
    DBuf ws(gi::vs_estimate_workspace_size(p));
    CUDA_OK(mx.poison());
    CUDA_OK(sm.poison());
    ST_OK(gi::vs_row_stats(p, mx.get<float>(), sm.get<float>(), ws.get(), ws.bytes(), 0));
    CUDA_OK(cudaDeviceSynchronize());
    RowStats part;
    CUDA_OK(mx.down(&part.max, rows));
    CUDA_OK(sm.down(&part.sum, rows));
    for (size_t r = 0; r < rows; ++r) {
      ASSERT_FALSE(std::isnan(part.max[r]) || std::isnan(part.sum[r])) << "row stat unwritten";
    }
    if (device_combine) {
      if (i == 0) {
        CUDA_OK(cudaMemcpy(gmx.get(), mx.get(), rows * 4, cudaMemcpyDeviceToDevice));
        CUDA_OK(cudaMemcpy(gsm.get(), sm.get(), rows * 4, cudaMemcpyDeviceToDevice));
      } else {
        ST_OK(gi::vs_combine_row_stats(gmx.get<float>(), gsm.get<float>(), mx.get<float>(),
                                       sm.get<float>(), rows, 0));
      }
    }
    cpu::combine_row_stats(combined, part);
  }
  if (device_combine) {
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(gmx.down(&s->stats.max, rows));
    CUDA_OK(gsm.down(&s->stats.sum, rows));
  } else {
    s->stats = combined;
  }
  CUDA_OK(gmx.up(s->stats.max));
  CUDA_OK(gsm.up(s->stats.sum));
  DBuf slash(static_cast<size_t>(e.H) * e.n * 4);
  CUDA_OK(slash.zero());
  s->col.assign(static_cast<size_t>(e.H) * e.n, std::numeric_limits<float>::quiet_NaN());
  for (size_t i = 0; i < nsh; ++i) {
    const int64_t k0 = bounds[i];
    const int nk = static_cast<int>(bounds[i + 1] - k0);
    const auto* kp = dk.get<uint16_t>() + k0 * e.Hkv * e.d;
    const VsEstimateParams p = est_params(e, dq.get(), kp, k0, nk, DType::kBF16);
    DBuf ws(gi::vs_estimate_workspace_size(p));
    DBuf col(static_cast<size_t>(e.H) * nk * 4);
    CUDA_OK(col.zero());
    ST_OK(gi::vs_scores(p, gmx.get<float>(), gsm.get<float>(), col.get<float>(), slash.get<float>(),
                        ws.get(), ws.bytes(), 0));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> c;
    CUDA_OK(col.down(&c, static_cast<size_t>(e.H) * nk));
    for (int h = 0; h < e.H; ++h)
      std::copy(c.begin() + static_cast<size_t>(h) * nk,
                c.begin() + static_cast<size_t>(h + 1) * nk, s->col.begin() + h * e.n + k0);
  }
  CUDA_OK(slash.down(&s->slash, static_cast<size_t>(e.H) * e.n));
}

// |a - b| <= rel * |b| + abs_frac * max|b| elementwise; reports the worst.
::testing::AssertionResult close_scores(const std::vector<float>& a, const std::vector<float>& b,
                                        double rel, double abs_frac) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "size";
  double m = 0;
  for (float x : b) m = std::max(m, std::fabs(static_cast<double>(x)));
  double worst = 0;
  size_t wi = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return ::testing::AssertionFailure() << "NaN at " << i;
    const double err = std::fabs(static_cast<double>(a[i]) - b[i]);
    const double tol = rel * std::fabs(static_cast<double>(b[i])) + abs_frac * m;
    if (err / tol > worst) {
      worst = err / tol;
      wi = i;
    }
  }
  if (worst > 1.0)
    return ::testing::AssertionFailure()
           << "at " << wi << ": " << a[wi] << " vs " << b[wi] << " (err/tol " << worst << ")";
  return ::testing::AssertionSuccess() << "worst err/tol " << worst;
}

constexpr double kRel = 2e-3, kAbs = 1e-6;

// Selections equal up to near-ties: every entry chosen by one side only has a reference
// score within tolerance of the reference k-th score (and is not forced).
void expect_sets_near(const std::vector<int>& ref, const std::vector<int>& got, const float* score,
                      int64_t n, int64_t forced, const std::string& what) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  std::set<int> a(ref.begin(), ref.end()), b(got.begin(), got.end());
  ASSERT_EQ(a.size(), ref.size()) << what << ": duplicates";
  ASSERT_EQ(b.size(), got.size()) << what << ": duplicates";
  float thr = std::numeric_limits<float>::infinity(), m = 0;
  for (int i : ref) {
    if (i >= forced) thr = std::min(thr, score[i]);
  }
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(score[i]));
  int mism = 0;
  for (int i : got) {
    ASSERT_TRUE(i >= 0 && i < n) << what;
    if (a.count(i)) continue;
    ++mism;
    ASSERT_GE(i, forced) << what;
    EXPECT_LE(std::fabs(score[i] - thr), kRel * std::fabs(thr) + kAbs * m)
        << what << ": " << i << " chosen by GPU only, score " << score[i] << " vs k-th " << thr;
  }
  for (int i : ref) {
    if (b.count(i)) continue;
    EXPECT_LE(std::fabs(score[i] - thr), kRel * std::fabs(thr) + kAbs * m)
        << what << ": " << i << " chosen by CPU only, score " << score[i] << " vs k-th " << thr;
  }
  if (mism) std::cout << what << ": " << mism << " near-tie swaps\n";
}

TEST_F(GpuIndex, EstimationMatchesCpu) {
  struct Case {
    int64_t n;
    int H, Hkv, d;
  };
  for (const Case c : {Case{1, 2, 1, 128}, Case{63, 2, 2, 64}, Case{65, 4, 2, 128},
                       Case{1000, 3, 1, 64}, Case{4099, 4, 2, 128}, Case{20000, 2, 1, 128}}) {
    const std::string what = "N=" + std::to_string(c.n) + " d=" + std::to_string(c.d);
    const EstData e = random_est(c.n, c.H, c.Hkv, c.d, 1000 + c.n);
    Scores ref, got;
    ASSERT_NO_FATAL_FAILURE(cpu_scores(e, &ref));
    ASSERT_NO_FATAL_FAILURE(gpu_scores(e, {0, c.n}, false, &got));
    for (size_t r = 0; r < ref.stats.max.size(); ++r) {
      ASSERT_NEAR(got.stats.max[r], ref.stats.max[r], 1e-4 * (1 + std::fabs(ref.stats.max[r])))
          << what << " row " << r;
      ASSERT_NEAR(got.stats.sum[r], ref.stats.sum[r], 1e-4 * ref.stats.sum[r]) << what;
    }
    EXPECT_TRUE(close_scores(got.col, ref.col, kRel, kAbs)) << what << " columns";
    EXPECT_TRUE(close_scores(got.slash, ref.slash, kRel, kAbs)) << what << " slashes";
    // selection on the GPU scores vs the CPU's on its own scores
    std::vector<int> vb(c.H), sb(c.H);
    for (int h = 0; h < c.H; ++h) {
      vb[h] = h % 2 ? 3500 : 1000;
      sb[h] = h % 2 ? 100 : 6096;
    }
    std::vector<VsSelection> gsel;
    ASSERT_NO_FATAL_FAILURE(run_gpu_select(got.col, got.slash, c.H, c.n, vb, sb, &gsel));
    for (int h = 0; h < c.H; ++h) {
      const VsSelection rs =
          cpu::vs_select(ref.col.data() + h * c.n, ref.slash.data() + h * c.n, c.n, vb[h], sb[h]);
      ASSERT_NO_FATAL_FAILURE(expect_sets_near(rs.columns, gsel[h].columns,
                                               ref.col.data() + h * c.n, c.n, kForcedColumns,
                                               what + " columns h" + std::to_string(h)));
      ASSERT_NO_FATAL_FAILURE(expect_sets_near(rs.offsets, gsel[h].offsets,
                                               ref.slash.data() + h * c.n, c.n, kForcedOffsets,
                                               what + " offsets h" + std::to_string(h)));
      ASSERT_TRUE(std::is_sorted(gsel[h].columns.begin(), gsel[h].columns.end()));
      ASSERT_TRUE(std::is_sorted(gsel[h].offsets.rbegin(), gsel[h].offsets.rend()));
    }
  }
}

TEST_F(GpuIndex, ShardedEqualsUnsharded) {
  const int64_t n = 7001;
  const EstData e = random_est(n, 3, 1, 128, 4242);
  Scores whole, sharded, dev;
  ASSERT_NO_FATAL_FAILURE(gpu_scores(e, {0, n}, false, &whole));
  ASSERT_NO_FATAL_FAILURE(gpu_scores(e, {0, 2000, 4500, n}, false, &sharded));
  ASSERT_NO_FATAL_FAILURE(gpu_scores(e, {0, 1000, 6990, n}, true, &dev));
  for (size_t r = 0; r < whole.stats.max.size(); ++r) {
    ASSERT_EQ(whole.stats.max[r], sharded.stats.max[r]);
    ASSERT_NEAR(whole.stats.sum[r], sharded.stats.sum[r], 1e-5 * whole.stats.sum[r]);
    ASSERT_EQ(whole.stats.max[r], dev.stats.max[r]);
    ASSERT_NEAR(whole.stats.sum[r], dev.stats.sum[r], 1e-5 * whole.stats.sum[r]);
  }
  EXPECT_TRUE(close_scores(sharded.col, whole.col, 1e-4, 1e-7));
  EXPECT_TRUE(close_scores(sharded.slash, whole.slash, 1e-4, 1e-7));
  EXPECT_TRUE(close_scores(dev.col, whole.col, 1e-4, 1e-7));
  EXPECT_TRUE(close_scores(dev.slash, whole.slash, 1e-4, 1e-7));
}

TEST_F(GpuIndex, PlantedColumnsAndDiagonalsFound) {
  const int64_t n = 5003;
  const int H = 2, d = 128;
  EstData e = random_est(n, H, 1, d, 77);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> u(d);
  double un = 0;
  for (float& x : u) {
    x = nd(rng);
    un += x * x;
  }
  for (float& x : u) x /= std::sqrt(un);
  const int nl = 64;
  for (int i = 0; i < nl; ++i)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < d; ++t) {
        float& q = e.q_last[(static_cast<size_t>(i) * H + h) * d + t];
        q = bf16_to_f32(f32_to_bf16(0.3f * q + 2.f * u[t]));
      }
  const std::vector<int> planted_cols = {777, 3000};
  for (int c : planted_cols)
    for (int t = 0; t < d; ++t)
      e.k[static_cast<size_t>(c) * d + t] = bf16_to_f32(f32_to_bf16(4.f * std::sqrt(128.f) * u[t]));
  // (slash budgets must exceed the 100 forced offsets for a planted one to fit.)
  // k[r_i - 1234] = 6 q_i (head 0): x = 6 scale |q_i|^2 ~ 8 per cell, 64 cells, while a
  // planted column adds one cell of x ~ 8 to each of 64 offsets.
  const int planted_off = 1234;
  for (int i = 0; i < nl; ++i) {
    const int64_t key = n - nl + i - planted_off;
    for (int t = 0; t < d; ++t)
      e.k[static_cast<size_t>(key) * d + t] =
          bf16_to_f32(f32_to_bf16(6.f * e.q_last[(static_cast<size_t>(i) * H + 0) * d + t]));
  }
  Scores got;
  ASSERT_NO_FATAL_FAILURE(gpu_scores(e, {0, n}, false, &got));
  std::vector<VsSelection> sel;
  ASSERT_NO_FATAL_FAILURE(run_gpu_select(got.col, got.slash, H, n, {200, 200}, {200, 200}, &sel));
  for (int h = 0; h < H; ++h) {
    for (int c : planted_cols) {
      EXPECT_TRUE(std::binary_search(sel[h].columns.begin(), sel[h].columns.end(), c))
          << "planted column " << c << " missing in head " << h;
    }
  }
  EXPECT_TRUE(std::find(sel[0].offsets.begin(), sel[0].offsets.end(), planted_off) !=
              sel[0].offsets.end())
      << "planted offset missing";
  // the planted offset is the best non-forced slash of head 0
  float best = -1;
  int64_t arg = -1;
  for (int64_t dd = kForcedOffsets; dd < n; ++dd) {
    if (got.slash[dd] > best) {
      best = got.slash[dd];
      arg = dd;
    }
  }
  EXPECT_EQ(arg, planted_off);
}

// ---------------------------------------------------------------- block-sparse
void gpu_block_sparse(const std::vector<float>& q, const std::vector<float>& k, int64_t n, int H,
                      int Hkv, int d, const std::vector<int>& topk, BlockSparseIndex* out) {
  const auto qb = to_bf16(q), kb = to_bf16(k);
  DBuf dq(qb.size() * 2), dk(kb.size() * 2);
  CUDA_OK(dq.up(qb));
  CUDA_OK(dk.up(kb));
  gi::BlockSparseEstimateParams p;
  p.q = dq.get();
  p.k = dk.get();
  p.q_row_stride = static_cast<int64_t>(H) * d;
  p.q_head_stride = d;
  p.k_row_stride = static_cast<int64_t>(Hkv) * d;
  p.k_head_stride = d;
  p.seq_len = n;
  p.num_heads = H;
  p.num_kv_heads = Hkv;
  p.head_dim = d;
  p.scale = 1.f / std::sqrt(static_cast<float>(d));
  p.dtype = DType::kBF16;
  const int64_t nb = num_blocks(n);
  const int kmax = *std::max_element(topk.begin(), topk.end());
  DBuf blocks(static_cast<size_t>(H) * nb * kmax * 4);
  CUDA_OK(blocks.poison());  // -1 everywhere: padding is indistinguishable, so also 0x7f
  CUDA_OK(cudaMemset(blocks.get(), 0x7f, blocks.bytes()));
  DBuf ws(gi::block_sparse_estimate_workspace_size(p));
  ST_OK(
      gi::block_sparse_estimate(p, topk.data(), blocks.get<int>(), kmax, ws.get(), ws.bytes(), 0));
  CUDA_OK(cudaDeviceSynchronize());
  out->seq_len = n;
  out->num_heads = H;
  out->nblocks = nb;
  out->k = kmax;
  CUDA_OK(blocks.down(&out->blocks, static_cast<size_t>(H) * nb * kmax));
}

BlockSparseIndex cpu_block_sparse(const std::vector<float>& q, const std::vector<float>& k,
                                  int64_t n, int H, int Hkv, int d, const std::vector<int>& topk) {
  cpu::BlockSparseEstimateParams p;
  p.q = q.data();
  p.k = k.data();
  p.q_row_stride = static_cast<int64_t>(H) * d;
  p.q_head_stride = d;
  p.k_row_stride = static_cast<int64_t>(Hkv) * d;
  p.k_head_stride = d;
  p.seq_len = n;
  p.num_heads = H;
  p.num_kv_heads = Hkv;
  p.head_dim = d;
  p.scale = 1.f / std::sqrt(static_cast<float>(d));
  p.dtype = DType::kF32;
  BlockSparseIndex ix;
  EXPECT_EQ(cpu::block_sparse_estimate(p, topk.data(), &ix), Status::kOk);
  return ix;
}

TEST_F(GpuIndex, BlockSparsePlantedEqualsCpu) {
  // Every row of block j holds the same vector (a_j, ...): pooled values and scores are
  // exact dyadic numbers, well separated, so the choice is unambiguous.
  const int64_t n = 64 * 37 + 13;
  const int H = 4, Hkv = 2, d = 64;
  const int64_t nb = num_blocks(n);
  std::mt19937_64 rng(11);
  std::vector<float> q(static_cast<size_t>(n) * H * d, 0.f),
      k(static_cast<size_t>(n) * Hkv * d, 0.f);
  for (int kh = 0; kh < Hkv; ++kh) {
    std::vector<int> perm(nb);
    std::iota(perm.begin(), perm.end(), 1);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t r = 0; r < n; ++r) {
      k[(r * Hkv + kh) * d + 0] = perm[r / 64] / 16.f;
      k[(r * Hkv + kh) * d + 5] = (perm[r / 64] % 3) / 4.f;  // kept zero-product below
    }
  }
  for (int h = 0; h < H; ++h)
    for (int64_t r = 0; r < n; ++r) {
      const int64_t b = r / 64;
      q[(r * H + h) * d + 0] = (b + h) % 3 == 0 ? -1.f : ((b + h) % 3 == 1 ? 1.f : 0.5f);
      q[(r * H + h) * d + 7] = 0.25f * (h + 1);
    }
  const std::vector<int> topk = {5, 10, 1, 40};
  const BlockSparseIndex ref = cpu_block_sparse(q, k, n, H, Hkv, d, topk);
  BlockSparseIndex got;
  ASSERT_NO_FATAL_FAILURE(gpu_block_sparse(q, k, n, H, Hkv, d, topk, &got));
  ASSERT_EQ(ref.k, got.k);
  ASSERT_EQ(ref.blocks.size(), got.blocks.size());
  for (size_t i = 0; i < ref.blocks.size(); ++i)
    ASSERT_EQ(ref.blocks[i], got.blocks[i]) << "slot " << i;
}

// Random data: the GPU dot follows the CPU's order and rounding, so the sets agree
// exactly unless the compiler contracted the CPU's products (then near-ties only).
TEST_F(GpuIndex, BlockSparseRandomMatchesCpu) {
  for (int64_t n : {1, 64, 65, 3001, 9000}) {
    const int H = 4, Hkv = 1, d = 128;
    auto q = test::random_normal(static_cast<size_t>(n) * H * d, 31 + n);
    auto k = test::random_normal(static_cast<size_t>(n) * Hkv * d, 37 + n);
    for (float& x : q) x = bf16_to_f32(f32_to_bf16(x));
    for (float& x : k) x = bf16_to_f32(f32_to_bf16(x));
    const std::vector<int> topk = {1, 7, 100, 3};
    const BlockSparseIndex ref = cpu_block_sparse(q, k, n, H, Hkv, d, topk);
    BlockSparseIndex got;
    ASSERT_NO_FATAL_FAILURE(gpu_block_sparse(q, k, n, H, Hkv, d, topk, &got));
    ASSERT_EQ(ref.blocks.size(), got.blocks.size());
    int64_t diff = 0;
    for (size_t i = 0; i < ref.blocks.size(); ++i) diff += ref.blocks[i] != got.blocks[i];
    EXPECT_EQ(diff, 0) << "N=" << n << ": " << diff << " slots differ";
    // layout: ascending, -1 padded, diagonal present
    const int64_t nb = num_blocks(n);
    for (int h = 0; h < H; ++h)
      for (int64_t b = 0; b < nb; ++b) {
        const int* s = got.blocks.data() + (h * nb + b) * got.k;
        const int take = static_cast<int>(std::min<int64_t>(topk[h], b + 1));
        for (int i = 0; i < got.k; ++i) {
          if (i < take) {
            ASSERT_TRUE(s[i] >= 0 && s[i] <= b);
            if (i) ASSERT_LT(s[i - 1], s[i]);
          } else {
            ASSERT_EQ(s[i], -1);
          }
        }
        ASSERT_TRUE(std::binary_search(s, s + take, static_cast<int>(b)));
      }
  }
}

TEST_F(GpuIndex, RejectsBadArguments) {
  VsEstimateParams p;
  EXPECT_EQ(gi::vs_row_stats(p, nullptr, nullptr, nullptr, 0, 0), Status::kInvalidArgument);
  EXPECT_FALSE(last_error().empty());
  gi::VsSelectionsDevice s;
  EXPECT_EQ(gi::vs_index_count(s, nullptr, nullptr, nullptr, 0, 0), Status::kInvalidArgument);
}

}  // namespace
}  // namespace mprefill
