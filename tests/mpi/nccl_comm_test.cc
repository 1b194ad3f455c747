// Communicator (NCCL backend) under mpirun, one rank per GPU: device buffers on a CUDA
// stream, data encoding rank and position, results agreed over ranks through MPI.
// Needs as many GPUs as ranks (ctest label gpu2: launch/DEVICE.md); skips loudly otherwise.
#include "comm/nccl_comm.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "tests/mpi/mpi_testutil.h"

namespace mprefill::comm {
namespace {

using test::mpi::expect_all_ranks_ok;

float encode(int rank, size_t i) { return static_cast<float>(rank * 1009 + (i % 997)); }

class NcclComm : public ::testing::Test {
 protected:
  void SetUp() override {
    mpi_ = test::mpi::world();
    const WorldInfo w = world_info();
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
    int32_t enough = devices >= w.local_size ? 1 : 0, all = 0;
    ASSERT_EQ(mpi_->all_reduce(&enough, &all, 1, DType::kI32, ReduceOp::kSum, nullptr),
              Status::kOk);
    if (all != mpi_->size())
      GTEST_SKIP() << "NCCL tests need one GPU per rank (" << w.local_size << " ranks, " << devices
                   << " GPUs visible)";
    std::string err;
    CommConfig cfg;
    cfg.timeout_ms = 60000;
    nccl_ = make_nccl_communicator(MPI_COMM_WORLD, w.local_rank, cfg, &err);
    ASSERT_TRUE(nccl_) << err;
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  void TearDown() override {
    nccl_.reset();
    if (stream_) cudaStreamDestroy(stream_);
  }
  float* device(const std::vector<float>& h) {
    float* d = nullptr;
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), h.size() * 4), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    owned_.push_back(d);
    return d;
  }
  std::vector<float> host(const float* d, size_t n) {
    std::vector<float> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  ~NcclComm() override {
    for (void* p : owned_) cudaFree(p);
  }
  std::unique_ptr<Communicator> mpi_, nccl_;
  cudaStream_t stream_ = nullptr;
  std::vector<void*> owned_;
};

TEST_F(NcclComm, AllReduceAllGatherBroadcast) {
  const int n = nccl_->size(), r = nccl_->rank();
  const size_t count = (1 << 20) + 3;
  std::vector<float> x(count);
  for (size_t i = 0; i < count; ++i) x[i] = encode(r, i);
  float* dx = device(x);
  float* dsum = device(std::vector<float>(count, -1.f));
  float* dall = device(std::vector<float>(count * n, -1.f));
  ASSERT_EQ(nccl_->all_reduce(dx, dsum, count, DType::kF32, ReduceOp::kSum, stream_), Status::kOk)
      << nccl_->last_error();
  ASSERT_EQ(nccl_->all_gather(dx, dall, count, DType::kF32, stream_), Status::kOk);
  ASSERT_EQ(nccl_->broadcast(dx, count, DType::kF32, n - 1, stream_), Status::kOk);
  ASSERT_EQ(nccl_->synchronize(stream_), Status::kOk) << nccl_->last_error();
  const auto sum = host(dsum, count), all = host(dall, count * n), b = host(dx, count);
  bool ok = true;
  for (size_t i = 0; i < count && ok; ++i) {
    float want = 0;
    for (int k = 0; k < n; ++k) want += encode(k, i);
    ok &= sum[i] == want;
    for (int k = 0; k < n; ++k) ok &= all[k * count + i] == encode(k, i);
    ok &= b[i] == encode(n - 1, i);
  }
  expect_all_ranks_ok(*mpi_, ok);
}

TEST_F(NcclComm, RingSendRecvInGroups) {
  const int n = nccl_->size(), r = nccl_->rank();
  const size_t count = 65537;
  std::vector<float> x(count);
  for (size_t i = 0; i < count; ++i) x[i] = encode(r, i);
  float* cur = device(x);
  float* next = device(std::vector<float>(count, -1.f));
  bool ok = true;
  for (int step = 1; step < n; ++step) {
    ASSERT_EQ(nccl_->group_start(), Status::kOk);
    ASSERT_EQ(nccl_->send(cur, count, DType::kF32, (r + 1) % n, stream_), Status::kOk);
    ASSERT_EQ(nccl_->recv(next, count, DType::kF32, (r - 1 + n) % n, stream_), Status::kOk);
    ASSERT_EQ(nccl_->group_end(), Status::kOk) << nccl_->last_error();
    ASSERT_EQ(nccl_->synchronize(stream_), Status::kOk) << nccl_->last_error();
    const int src = ((r - step) % n + n) % n;
    const auto got = host(next, count);
    for (size_t i = 0; i < count; ++i) ok &= got[i] == encode(src, i);
    std::swap(cur, next);
  }
  expect_all_ranks_ok(*mpi_, ok);
}

}  // namespace
}  // namespace mprefill::comm
