// Sparse attention forward (kernels/cuda/sparse) against CPU references over the same
// mask, the mask taken from the definitions (tests/cpu/reference.h: VsBlockSets straight
// from BENCHMARKS.md, block lists, the A-shape predicate), not from the kernel's index.
// Pass rule, references and poisoning: tests/gpu/attention_check.h.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/sparse/sparse_attention.h"
#include "kernels/sparse.h"
#include "kernels/types.h"
#include "tests/cpu/reference.h"
#include "tests/gpu/attention_check.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

enum class Pat { kVs, kBlock, kAShape };

using test::gpu::Visible;

struct Case {
  Pat pat = Pat::kVs;
  int64_t seq_len = 0;  // N (global)
  int n_q = 0, n_k = 0, heads = 1, kv_heads = 1, dim = 128;
  int64_t q_pos0 = 0, k_pos0 = 0;
  int pad = 0;
  DType dtype = DType::kBF16;
  uint64_t seed = 1;
  // vertical-slash: selections of index heads [0, heads + head_offset)
  std::vector<VsSelection> sel;
  int head_offset = 0;
  // block-sparse: lists [index heads][nblocks][k]
  BlockSparseIndex bs;
  // A-shape
  int n_init = 0, n_local = 0;
  std::string label;

  std::string name() const {
    std::ostringstream s;
    s << label << " " << to_string(dtype) << " N=" << seq_len << " nq=" << n_q << " nk=" << n_k
      << " h=" << heads << "/" << kv_heads << " d=" << dim << " qpos0=" << q_pos0
      << " kpos0=" << k_pos0 << " pad=" << pad << " hoff=" << head_offset;
    return s.str();
  }
};

void run_case(const Case& c) {
  SCOPED_TRACE(c.name());
  const test::gpu::Shape sh = test::gpu::shape_of(c);
  const test::gpu::Host h = test::gpu::make_inputs(sh);

  // Mask straight from the definitions.
  std::vector<test::ref::VsBlockSets> sets;
  std::vector<std::vector<std::set<int>>> lists;
  Visible vis;
  if (c.pat == Pat::kVs) {
    for (int hh = 0; hh < c.heads; ++hh) sets.emplace_back(c.sel[c.head_offset + hh], c.seq_len);
    vis = [&](int hh, int64_t r, int64_t col) {
      return col >= 0 && col < c.seq_len && sets[hh].visible(r, col);
    };
  } else if (c.pat == Pat::kBlock) {
    lists.assign(c.heads, std::vector<std::set<int>>(c.bs.nblocks));
    for (int hh = 0; hh < c.heads; ++hh)
      for (int64_t b = 0; b < c.bs.nblocks; ++b)
        for (int t = 0; t < c.bs.k; ++t) {
          const int j = c.bs.blocks[((c.head_offset + hh) * c.bs.nblocks + b) * c.bs.k + t];
          if (j >= 0) lists[hh][b].insert(j);
        }
    vis = [&](int hh, int64_t r, int64_t col) {
      return col >= 0 && col <= r && lists[hh][r / 64].count(int(col / 64)) > 0;
    };
  } else {
    vis = [&](int, int64_t r, int64_t col) {
      return col >= 0 && col <= r && (col < c.n_init || r - col < c.n_local);
    };
  }

  const test::gpu::Ref ref = test::gpu::reference(sh, h, vis);

  // Every kernel generation (kernels/cuda/sparse/sparse_attention.h; the default, kAuto,
  // picks one of them per pattern), each on fresh, poisoned buffers.
  for (const cuda::SparseKernelGen gen :
       {cuda::SparseKernelGen::kV1, cuda::SparseKernelGen::kV2, cuda::SparseKernelGen::kSkel,
        cuda::SparseKernelGen::kSkelOwner, cuda::SparseKernelGen::kSkelPlan}) {
    const int version = static_cast<int>(gen);
    SCOPED_TRACE("sparse kernel v" + std::to_string(version));
    test::gpu::DeviceBuffers dev(sh, h);
    ASSERT_TRUE(dev.ok()) << "cudaMalloc/cudaMemcpy failed";
    AttentionParams p = dev.params();
    p.causal = true;
    Status st = Status::kInternal;
    if (c.pat == Pat::kVs) {
      const VsIndex ix = cpu::vs_build_index(c.sel, c.seq_len);
      VsIndexView v;
      v.seq_len = ix.seq_len;
      v.nblocks = ix.nblocks;
      v.range_ptr = dev.upload(ix.range_ptr);
      v.range_lo = dev.upload(ix.range_lo);
      v.range_hi = dev.upload(ix.range_hi);
      v.col_ptr = dev.upload(ix.col_ptr);
      v.col = dev.upload(ix.col);
      ASSERT_TRUE(dev.ok()) << "index upload failed";
      st = cuda::vs_attention_fwd(p, v, c.head_offset, nullptr, gen);
    } else if (c.pat == Pat::kBlock) {
      BlockSparseView v = view(c.bs);
      v.blocks = dev.upload(c.bs.blocks);
      ASSERT_TRUE(dev.ok()) << "index upload failed";
      st = cuda::block_sparse_attention_fwd(p, v, c.head_offset, nullptr, gen);
    } else {
      st = cuda::ashape_attention_fwd(p, c.n_init, c.n_local, nullptr, gen);
    }
    ASSERT_EQ(st, Status::kOk) << to_string(st) << ": " << cuda::last_error();
    dev.check(ref, c.name() + " v" + std::to_string(version));
  }
}

// ---------------------------------------------------------------- index sets
// `clustered` style: columns 0..29 + uniform; offsets 0..99 then mostly 100 + Exp(2048),
// sometimes log-uniform (as model/index_sets.h, re-drawn here so the test needs only
// the kernels library). `uniform` style: offsets 0..99 + uniform.
VsSelection styled_selection(int64_t n, int v, int s, bool clustered, std::mt19937_64& g) {
  std::set<int> cols, offs;
  v = int(std::min<int64_t>(n, std::max(v, 30)));
  s = int(std::min<int64_t>(n, std::max(s, 50)));
  for (int c = 0; c < 30 && c < n; ++c) cols.insert(c);
  std::uniform_int_distribution<int64_t> any(0, n - 1);
  while (int(cols.size()) < v) cols.insert(int(any(g)));
  for (int d = 0; d < 100 && d < n && int(offs.size()) < s; ++d) offs.insert(d);
  std::exponential_distribution<double> ex(1.0 / 2048);
  std::uniform_real_distribution<double> u(std::log(100.0),
                                           std::log(double(std::max<int64_t>(n, 101))));
  std::uniform_real_distribution<double> coin(0, 1);
  while (int(offs.size()) < s) {
    int64_t d;
    if (!clustered)
      d = any(g);
    else if (coin(g) < 0.8)
      d = 100 + int64_t(std::floor(ex(g)));
    else
      d = int64_t(std::floor(std::exp(u(g))));
    if (d < n) offs.insert(int(d));
  }
  VsSelection sel;
  sel.columns.assign(cols.begin(), cols.end());
  sel.offsets.assign(offs.rbegin(), offs.rend());
  return sel;
}

// Random block lists: block b always has b, plus up to k-1 distinct blocks j < b.
BlockSparseIndex random_blocks(int64_t n, int heads, int k, std::mt19937_64& g) {
  BlockSparseIndex ix;
  ix.seq_len = n;
  ix.num_heads = heads;
  ix.nblocks = num_blocks(n);
  ix.k = k;
  ix.blocks.assign(size_t(heads) * ix.nblocks * k, -1);
  for (int h = 0; h < heads; ++h)
    for (int64_t b = 0; b < ix.nblocks; ++b) {
      std::set<int> s{int(b)};
      std::uniform_int_distribution<int> pick(0, int(b));
      const int want = std::min<int>(k, int(b) + 1) - int(g() % 2);  // sometimes padded
      for (int tries = 0; int(s.size()) < want && tries < 4 * k; ++tries) s.insert(pick(g));
      int t = 0;
      for (int j : s) ix.blocks[(h * ix.nblocks + b) * k + t++] = j;
    }
  return ix;
}

class SparseAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!test::gpu::hopper_ok("sparse attention", &why)) GTEST_SKIP() << why;
    checks_before_ = test::gpu::checks_done();
  }
  void TearDown() override { test::gpu::expect_checked_since(checks_before_); }
  bool built(DType t, int dim) {
    if (cuda::sparse_attention_supported(t, dim)) return true;
    std::printf("[ skip ] %s head_dim %d not built in this configuration\n", to_string(t), dim);
    return false;
  }
  int checks_before_ = 0;
};

const int kSizes[] = {1, 63, 65, 127, 200, 1000, 4099};

Case vs_case(int64_t n, int heads, int kv_heads, int nv, int ns, uint64_t seed, bool clustered,
             int extra_heads = 0, bool random_sel = false) {
  Case c;
  c.pat = Pat::kVs;
  c.seq_len = n;
  c.n_q = c.n_k = int(n);
  c.heads = heads;
  c.kv_heads = kv_heads;
  c.seed = seed;
  c.head_offset = extra_heads;
  std::mt19937_64 g(seed);
  for (int hh = 0; hh < heads + extra_heads; ++hh) {
    // Budgets vary per head, as in the Llama-3-8B mix.
    const int v = nv + int(g() % 7), s = ns + int(g() % 5);
    c.sel.push_back(random_sel ? test::ref::random_selection(n, v, s, g)
                               : styled_selection(n, v, s, clustered, g));
  }
  c.label = random_sel ? "vs-random" : clustered ? "vs-clustered" : "vs-uniform";
  return c;
}

TEST_F(SparseAttention, VerticalSlashRandomSelections) {
  uint64_t seed = 100;
  for (int n : kSizes) {
    // Small budgets at small N leave gaps; both GQA 4:1 and 1:1.
    run_case(vs_case(n, 8, 2, 3 + n / 50, 2 + n / 40, seed++, false, 0, true));
    run_case(vs_case(n, 3, 3, 1 + n / 100, 1 + n / 100, seed++, false, 0, true));
  }
}

TEST_F(SparseAttention, VerticalSlashStyledSets) {
  run_case(vs_case(4099, 4, 1, 60, 120, 201, true));
  run_case(vs_case(4099, 4, 4, 200, 60, 202, false));
  run_case(vs_case(1000, 8, 2, 30, 50, 203, true, 3));  // head_offset 3
  run_case(vs_case(4099, 4, 1, 1000, 50, 204, true));   // column-heavy
}

// A ring step: queries and keys are slices of the global sequence.
Case ring(Case c, int64_t q_pos0, int n_q, int64_t k_pos0, int n_k) {
  c.q_pos0 = q_pos0;
  c.n_q = n_q;
  c.k_pos0 = k_pos0;
  c.n_k = n_k;
  c.label += "-ring";
  return c;
}

TEST_F(SparseAttention, VerticalSlashRingSteps) {
  const Case base = vs_case(4099, 4, 1, 80, 100, 301, true, 1);
  run_case(ring(base, 3000, 1099, 1000, 1500));  // shard in the middle, queries after it
  run_case(ring(base, 1037, 700, 1000, 1500));   // queries inside the shard, odd start
  run_case(ring(base, 100, 500, 2000, 1000));    // shard wholly in the future: all empty
  run_case(ring(base, 4000, 99, 0, 63));         // tiny shard at the start (forced columns)
  run_case(ring(base, 1000, 200, 1030, 500));    // rows 1000..1029 see no key, the rest do
  const Case small = vs_case(200, 4, 2, 5, 3, 302, false, 0, true);
  run_case(ring(small, 65, 70, 30, 100));
}

TEST_F(SparseAttention, VerticalSlashStrided) {
  Case c = vs_case(1000, 4, 2, 40, 60, 401, true);
  c.pad = 8;
  run_case(c);
}

Case bs_case(int64_t n, int heads, int kv_heads, int k, uint64_t seed, int extra_heads = 0) {
  Case c;
  c.pat = Pat::kBlock;
  c.seq_len = n;
  c.n_q = c.n_k = int(n);
  c.heads = heads;
  c.kv_heads = kv_heads;
  c.seed = seed;
  c.head_offset = extra_heads;
  std::mt19937_64 g(seed);
  c.bs = random_blocks(n, heads + extra_heads, k, g);
  c.label = "block-sparse";
  return c;
}

TEST_F(SparseAttention, BlockSparse) {
  uint64_t seed = 500;
  for (int n : kSizes) run_case(bs_case(n, 4, 1, 5, seed++));
  run_case(bs_case(4099, 4, 4, 20, seed++, 2));
  run_case(ring(bs_case(4099, 4, 2, 12, seed++), 2000, 1500, 1500, 2000));
  run_case(ring(bs_case(1000, 4, 2, 8, seed++), 10, 300, 700, 300));  // shard in the future
}

Case as_case(int n_q, int n_k, int heads, int kv_heads, int n_init, int n_local, uint64_t seed) {
  Case c;
  c.pat = Pat::kAShape;
  c.n_q = n_q;
  c.n_k = n_k;
  c.heads = heads;
  c.kv_heads = kv_heads;
  c.n_init = n_init;
  c.n_local = n_local;
  c.seed = seed;
  c.label = "ashape(" + std::to_string(n_init) + "," + std::to_string(n_local) + ")";
  return c;
}

TEST_F(SparseAttention, AShape) {
  uint64_t seed = 600;
  for (int n : kSizes) run_case(as_case(n, n, 4, 1, 64, 256, seed++));
  run_case(as_case(1000, 1000, 3, 3, 10, 100, seed++));
  run_case(as_case(1000, 1000, 4, 2, 0, 37, seed++));
  run_case(as_case(1000, 1000, 4, 2, 100, 0, seed++));
  run_case(as_case(1000, 1000, 4, 2, 500, 600, seed++));  // windows overlap
  Case c = as_case(700, 2000, 4, 1, 30, 300, seed++);
  c.q_pos0 = 3001;
  c.k_pos0 = 1500;
  c.label += "-ring";
  run_case(c);  // shard past the sink: local window only
  Case e = as_case(200, 300, 4, 1, 30, 300, seed++);
  e.q_pos0 = 0;
  e.k_pos0 = 500;
  e.label += "-future";
  run_case(e);
}

TEST_F(SparseAttention, HeadDim64) {
  if (!built(DType::kBF16, 64)) GTEST_SKIP() << "bf16 head_dim 64 not built (MPREFILL_CUDA_SUBSET)";
  Case c = vs_case(1000, 4, 1, 40, 60, 701, true);
  c.dim = 64;
  run_case(c);
  Case a = as_case(1000, 1000, 4, 2, 64, 200, 702);
  a.dim = 64;
  run_case(a);
}

TEST_F(SparseAttention, Fp16) {
  if (!built(DType::kF16, 128))
    GTEST_SKIP() << "fp16 head_dim 128 not built (MPREFILL_CUDA_SUBSET)";
  Case c = vs_case(1000, 4, 2, 40, 60, 703, true);
  c.dtype = DType::kF16;
  run_case(c);
  Case b = bs_case(1000, 4, 1, 6, 704);
  b.dtype = DType::kF16;
  run_case(b);
}

// Argument checks return before any launch, so this runs without a GPU too.
TEST(SparseAttentionApi, RejectsBadArguments) {
  std::vector<uint16_t> dummy(256);
  AttentionParams p;
  p.q = p.k = p.v = dummy.data();
  p.o = dummy.data();
  p.n_q = p.n_k = 1;
  p.num_heads = p.num_kv_heads = 1;
  p.head_dim = 96;
  set_packed_strides(p);
  p.scale = 0.1f;
  p.dtype = DType::kBF16;
  EXPECT_EQ(cuda::ashape_attention_fwd(p, 4, 4, nullptr), Status::kUnsupported);
  EXPECT_NE(cuda::last_error().find("head_dim 96"), std::string::npos) << cuda::last_error();
  p.head_dim = 128;
  set_packed_strides(p);
  p.causal = false;
  EXPECT_EQ(cuda::ashape_attention_fwd(p, 4, 4, nullptr), Status::kInvalidArgument);
  p.causal = true;
  EXPECT_EQ(cuda::ashape_attention_fwd(p, -1, 4, nullptr), Status::kInvalidArgument);
  VsIndexView ix;  // null pointers
  ix.seq_len = 1;
  ix.nblocks = 1;
  EXPECT_EQ(cuda::vs_attention_fwd(p, ix, 0, nullptr), Status::kInvalidArgument);
  BlockSparseView bs;
  bs.seq_len = 64;
  bs.nblocks = 1;
  bs.k = 1;
  EXPECT_EQ(cuda::block_sparse_attention_fwd(p, bs, 0, nullptr), Status::kInvalidArgument);
  bs.blocks = reinterpret_cast<const int*>(dummy.data());
  p.q_pos0 = 64;  // rows past seq_len
  EXPECT_EQ(cuda::block_sparse_attention_fwd(p, bs, 0, nullptr), Status::kInvalidArgument);
  // A generation outside SparseKernelGen is refused before any launch (p is launchable).
  p.q_pos0 = 0;
  for (const int bad : {6, -1}) {
    const auto gen = static_cast<cuda::SparseKernelGen>(bad);
    EXPECT_EQ(cuda::ashape_attention_fwd(p, 4, 4, nullptr, gen), Status::kInvalidArgument) << bad;
    EXPECT_NE(cuda::last_error().find("gen"), std::string::npos) << cuda::last_error();
    EXPECT_EQ(cuda::block_sparse_attention_fwd(p, bs, 0, nullptr, gen), Status::kInvalidArgument)
        << bad;
  }
}

}  // namespace
}  // namespace mprefill
