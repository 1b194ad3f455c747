// Dense flash-attention forward (kernels/cuda/flash) against CPU references.
//
// Pass rule, references and poisoning: tests/gpu/attention_check.h.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/flash/flash.h"
#include "kernels/types.h"
#include "tests/gpu/attention_check.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

struct Case {
  int n_q, n_k, heads, kv_heads, dim;
  bool causal;
  int64_t q_pos0 = 0, k_pos0 = 0;
  int pad = 0;  // extra elements at the end of every Q/K/V/O row (strided layout)
  DType dtype = DType::kBF16;
  uint64_t seed = 1;

  std::string name() const {
    std::ostringstream s;
    s << to_string(dtype) << " nq=" << n_q << " nk=" << n_k << " h=" << heads << "/" << kv_heads
      << " d=" << dim << (causal ? " causal" : " noncausal") << " qpos0=" << q_pos0
      << " kpos0=" << k_pos0 << " pad=" << pad;
    return s.str();
  }
};

void run_case(const Case& c) {
  SCOPED_TRACE(c.name());
  const test::gpu::Shape s = test::gpu::shape_of(c);
  const test::gpu::Host h = test::gpu::make_inputs(s);
  const test::gpu::Ref ref = test::gpu::reference(
      s, h, [&](int, int64_t r, int64_t col) { return !c.causal || col <= r; });
  test::gpu::DeviceBuffers dev(s, h);
  ASSERT_TRUE(dev.ok()) << "cudaMalloc/cudaMemcpy failed";
  AttentionParams p = dev.params();
  p.causal = c.causal;
  const Status st = cuda::flash_attention_fwd(p, nullptr);
  ASSERT_EQ(st, Status::kOk) << to_string(st) << ": " << cuda::last_error();
  dev.check(ref, c.name());
}

class FlashAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!test::gpu::hopper_ok("flash attention", &why)) GTEST_SKIP() << why;
    checks_before_ = test::gpu::checks_done();
  }
  void TearDown() override { test::gpu::expect_checked_since(checks_before_); }
  void run(Case c) { run_case(c); }
  // Skips the test when this build has no instance for (dtype, head_dim), e.g. with
  // MPREFILL_CUDA_SUBSET (bf16 / head_dim 128 only).
  bool built(DType t, int dim) {
    if (cuda::flash_attention_supported(t, dim)) return true;
    std::printf("[ skip ] %s head_dim %d not built in this configuration\n", to_string(t), dim);
    return false;
  }
  int checks_before_ = 0;
};

const int kSizes[] = {1, 63, 65, 127, 200, 1000, 4099};

TEST_F(FlashAttention, CausalSquareGqa4) {
  uint64_t seed = 10;
  for (int n : kSizes) {
    const int heads = n > 1000 ? 4 : 8;
    run({n, n, heads, heads / 4, 128, true, 0, 0, 0, DType::kBF16, seed++});
  }
}

TEST_F(FlashAttention, NonCausalGqa) {
  run({65, 1000, 8, 2, 128, false, 0, 0, 0, DType::kBF16, 21});
  run({200, 127, 6, 6, 128, false, 0, 0, 0, DType::kBF16, 22});
  run({1, 4099, 4, 1, 128, false, 0, 0, 0, DType::kBF16, 23});
  run({1000, 63, 4, 1, 128, false, 0, 0, 0, DType::kBF16, 24});
  run({127, 1, 3, 3, 128, false, 0, 0, 0, DType::kBF16, 25});
}

TEST_F(FlashAttention, CausalWithPositionOffsets) {
  // Chunked prefill: 200 queries at the end of 1000 keys.
  run({200, 1000, 8, 2, 128, true, 800, 0, 0, DType::kBF16, 31});
  // KV shard entirely in the past: every key visible.
  run({65, 300, 4, 1, 128, true, 1000, 0, 0, DType::kBF16, 32});
  // KV shard entirely in the future: every row empty (o = 0, lse = -inf).
  run({127, 200, 4, 1, 128, true, 0, 5000, 0, DType::kBF16, 33});
  // Rows 0..49 see no key, the rest a growing prefix.
  run({200, 300, 4, 2, 128, true, 100, 150, 0, DType::kBF16, 34});
  // Odd offset against a long shard; 1:1 heads.
  run({65, 4099, 2, 2, 128, true, 37, 0, 0, DType::kBF16, 35});
  // Positions past 2^32.
  run({63, 1000, 4, 1, 128, true, int64_t(5) << 32, (int64_t(5) << 32) - 500, 0, DType::kBF16, 36});
  // Empty KV shard: no keys at all.
  run({65, 0, 4, 1, 128, true, 0, 0, 0, DType::kBF16, 38});
  run({65, 0, 4, 1, 128, false, 0, 0, 0, DType::kBF16, 39});
  // Queries before the shard begins only partly: 1000 rows, shard starts at row 700.
  run({1000, 1000, 4, 1, 128, true, 0, 700, 0, DType::kBF16, 37});
}

TEST_F(FlashAttention, StridedRows) {
  run({200, 1000, 4, 2, 128, true, 800, 0, 8, DType::kBF16, 41});
  run({127, 65, 4, 4, 128, false, 0, 0, 64, DType::kBF16, 42});
}

TEST_F(FlashAttention, HeadDim64) {
  if (!built(DType::kBF16, 64)) GTEST_SKIP() << "bf16 head_dim 64 not built (MPREFILL_CUDA_SUBSET)";
  run({1000, 1000, 8, 2, 64, true, 0, 0, 0, DType::kBF16, 51});
  run({200, 4099, 4, 1, 64, false, 0, 0, 0, DType::kBF16, 52});
  run({200, 300, 4, 2, 64, true, 100, 150, 0, DType::kBF16, 53});
}

// head_dim 48 (stories15M) runs the 64 kernel with TMA zero-filling columns 48..63;
// packed heads are 48 apart, so a stray store or load past column 47 hits the neighbour
// head (or the poisoned row padding) and fails the check.
TEST_F(FlashAttention, HeadDim48) {
  if (!built(DType::kBF16, 48)) GTEST_SKIP() << "bf16 head_dim 48 not built (MPREFILL_CUDA_SUBSET)";
  run({1000, 1000, 8, 2, 48, true, 0, 0, 0, DType::kBF16, 71});
  run({200, 4099, 4, 1, 48, false, 0, 0, 0, DType::kBF16, 72});
  run({200, 300, 4, 2, 48, true, 100, 150, 0, DType::kBF16, 73});
  run({127, 65, 6, 3, 48, false, 0, 0, 8, DType::kBF16, 74});
  run({200, 1000, 4, 1, 48, true, 800, 0, 16, DType::kBF16, 75});
}

TEST_F(FlashAttention, HeadDim48Fp16) {
  if (!built(DType::kF16, 48)) GTEST_SKIP() << "fp16 head_dim 48 not built (MPREFILL_CUDA_SUBSET)";
  run({1000, 1000, 8, 2, 48, true, 0, 0, 0, DType::kF16, 76});
}

TEST_F(FlashAttention, Fp16) {
  if (!built(DType::kF16, 128) || !built(DType::kF16, 64))
    GTEST_SKIP() << "fp16 not built (MPREFILL_CUDA_SUBSET)";
  run({1000, 1000, 8, 2, 128, true, 0, 0, 0, DType::kF16, 61});
  run({65, 4099, 4, 1, 128, false, 0, 0, 0, DType::kF16, 62});
  run({200, 300, 4, 2, 64, true, 100, 150, 0, DType::kF16, 63});
}

// Argument checks return before any launch, so this runs without a GPU too.
TEST(FlashAttentionApi, RejectsUnsupported) {
  std::vector<uint16_t> dummy(16);
  AttentionParams p;
  p.q = p.k = p.v = dummy.data();
  p.o = dummy.data();
  p.n_q = p.n_k = 1;
  p.num_heads = p.num_kv_heads = 1;
  p.head_dim = 96;
  set_packed_strides(p);
  p.scale = 0.1f;
  p.dtype = DType::kBF16;
  EXPECT_EQ(cuda::flash_attention_fwd(p, nullptr), Status::kUnsupported);
  EXPECT_NE(cuda::last_error().find("head_dim 96"), std::string::npos) << cuda::last_error();
  p.head_dim = 128;
  p.dtype = DType::kF32;
  set_packed_strides(p);
  EXPECT_EQ(cuda::flash_attention_fwd(p, nullptr), Status::kUnsupported);
  p.dtype = DType::kBF16;
  p.q_row_stride = 130;  // not a multiple of 8 elements
  EXPECT_EQ(cuda::flash_attention_fwd(p, nullptr), Status::kUnsupported);
  p.q_row_stride = 128;
  p.num_kv_heads = 2;  // 1 % 2 != 0
  EXPECT_EQ(cuda::flash_attention_fwd(p, nullptr), Status::kInvalidArgument);
}

}  // namespace
}  // namespace mprefill
