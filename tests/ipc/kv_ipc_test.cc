// Transport "ipc" between real processes (label gpu): one decoder process (KvReceiver, the
// job's KV region on its GPU) and three worker-rank processes (kv::make_sender("ipc")) on
// one GPU hand off a random bf16 KV of an awkward shape (777 tokens, 64-token pages, 3 KV
// heads of 40, 5 layers; ranks with two token ranges and non-contiguous head subsets).
// The KV the decoder's region holds must equal, byte for byte, what each rank computed
// (widened exactly to fp32 when the contract is fp32).
// Without a GPU each test skips (MPREFILL_REQUIRE_GPU=1 turns the skip into a failure).
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

int visible_gpus() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

#define REQUIRE_GPUS(n)                                                                       \
  do {                                                                                        \
    if (visible_gpus() < (n)) {                                                               \
      if (std::getenv("MPREFILL_REQUIRE_GPU") && (n) == 1)                                    \
        FAIL() << "MPREFILL_REQUIRE_GPU is set but no CUDA device is usable";                 \
      GTEST_SKIP() << "needs " << (n) << " CUDA device(s), " << visible_gpus() << " visible"; \
    }                                                                                         \
  } while (0)

pid_t spawn(const std::vector<std::string>& args, const std::string& log) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc == 0 ? pid : -1;
}

// Exit status of pid within timeout_ms, else kills it and returns -1.
int wait_exit(pid_t pid, int timeout_ms) {
  const auto end = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int st = 0;
    if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
    if (Clock::now() > end) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

struct Rank {
  std::vector<int> heads;
  std::vector<std::pair<int64_t, int64_t>> ranges;
};

std::string join_heads(const std::vector<int>& h) {
  std::string s;
  for (int x : h) {
    if (!s.empty()) s += ',';
    s += std::to_string(x);
  }
  return s;
}
std::string join_ranges(const std::vector<std::pair<int64_t, int64_t>>& r) {
  std::string s;
  for (auto [b, e] : r) {
    if (!s.empty()) s += ',';
    s += std::to_string(b);
    s += ':';
    s += std::to_string(e);
  }
  return s;
}

// Runs the decoder on dec_dev and the ranks on work_dev; compares the decoder's region with
// what the ranks computed.
// f32: an fp32 KV contract, so the ranks' bf16 slices are widened into the region.
void run_handoff(int dec_dev, int work_dev, bool f32 = false) {
  const int64_t N = 777;
  const int layers = 5, kvh = 3, hd = 40, P = 64;
  // Ranks: heads {0, 2} split over two sequence shards (one with two ranges), head {1} whole.
  const std::vector<Rank> ranks = {
      {{0, 2}, {{0, 300}, {650, 777}}}, {{0, 2}, {{300, 650}}}, {{1}, {{0, 777}}}};
  const fs::path dir =
      fs::temp_directory_path() / ("kv_ipc_test_" + std::to_string(getpid()) + "_" +
                                   std::to_string(dec_dev) + (f32 ? "_f32" : ""));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::vector<std::string> shape = {"--tokens",      std::to_string(N),
                                          "--layers",      std::to_string(layers),
                                          "--kv-heads",    std::to_string(kvh),
                                          "--head-dim",    std::to_string(hd),
                                          "--page-tokens", std::to_string(P),
                                          "--senders",     std::to_string(ranks.size()),
                                          "--timeout-ms",  "20000",
                                          "--contract",    f32 ? "f32" : "bf16"};
  auto with = [&](std::vector<std::string> a, const std::vector<std::string>& more) {
    a.insert(a.end(), shape.begin(), shape.end());
    a.insert(a.end(), more.begin(), more.end());
    return a;
  };
  const std::string peer = KV_IPC_PEER;
  const std::string port_file = (dir / "port").string();
  const pid_t dec =
      spawn(with({peer, "decoder"},
                 {"--device", std::to_string(dec_dev), "--port-file", port_file, "--out",
                  (dir / "decoder.bin").string(), "--exit-file", (dir / "exit").string()}),
            (dir / "decoder.log").string());
  ASSERT_GT(dec, 0) << "cannot start " << peer;
  std::string port;
  for (auto end = Clock::now() + std::chrono::seconds(60); port.empty() && Clock::now() < end;) {
    std::ifstream f(port_file);
    if (!(f >> port)) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (port.empty()) {
    wait_exit(dec, 1);
    FAIL() << "decoder wrote no port within 60 s: " << slurp((dir / "decoder.log").string());
  }
  std::vector<pid_t> workers;
  for (size_t r = 0; r < ranks.size(); ++r)
    workers.push_back(spawn(
        with({peer, "worker"},
             {"--device", std::to_string(work_dev), "--port", port, "--rank", std::to_string(r),
              "--heads", join_heads(ranks[r].heads), "--ranges", join_ranges(ranks[r].ranges),
              "--seed", "11", "--out", (dir / ("worker" + std::to_string(r) + ".bin")).string()}),
        (dir / ("worker" + std::to_string(r) + ".log")).string()));
  for (size_t r = 0; r < ranks.size(); ++r) {
    const std::string log = (dir / ("worker" + std::to_string(r) + ".log")).string();
    if (workers[r] <= 0) {
      ADD_FAILURE() << "cannot start worker rank " << r;
      continue;
    }
    EXPECT_EQ(wait_exit(workers[r], 120000), 0) << "worker rank " << r << ": " << slurp(log);
    std::printf("%s", slurp(log).c_str());
  }
  std::ofstream(dir / "exit") << "done\n";  // the ranks are through: the decoder may close
  const std::string dlog = (dir / "decoder.log").string();
  ASSERT_EQ(wait_exit(dec, 60000), 0) << "decoder: " << slurp(dlog);
  std::printf("%s", slurp(dlog).c_str());

  // The expected KV: every rank's rows put at their (token, head) cells.
  const size_t esz = f32 ? 4 : 2;
  const size_t row = static_cast<size_t>(kvh) * hd * esz, tensor = N * row;
  const std::string got = slurp((dir / "decoder.bin").string());
  ASSERT_EQ(got.size(), 2 * tensor * layers);
  std::string want(got.size(), '\0');
  std::vector<char> covered(N * kvh * layers, 0);
  for (size_t r = 0; r < ranks.size(); ++r) {
    const std::string w = slurp((dir / ("worker" + std::to_string(r) + ".bin")).string());
    int64_t rows = 0;
    for (auto [b, e] : ranks[r].ranges) rows += e - b;
    const size_t nh = ranks[r].heads.size(), n = rows * nh * hd * 2;
    ASSERT_EQ(w.size(), 2 * n * layers) << "rank " << r;
    for (int l = 0; l < layers; ++l)
      for (int t = 0; t < 2; ++t) {
        const char* src = w.data() + (2 * l + t) * n;
        int64_t i = 0;
        for (auto [b, e] : ranks[r].ranges)
          for (int64_t tok = b; tok < e; ++tok, ++i)
            for (size_t j = 0; j < nh; ++j) {
              const int h = ranks[r].heads[j];
              char* dst = want.data() + (2 * l + t) * tensor + tok * row + h * hd * esz;
              const char* from = src + (i * nh + j) * hd * 2;
              if (!f32) {
                std::memcpy(dst, from, hd * 2);
              } else {
                for (int d = 0; d < hd; ++d) {  // bf16 -> fp32: the upper 16 bits
                  uint16_t b16;
                  std::memcpy(&b16, from + 2 * d, 2);
                  const uint32_t w = uint32_t(b16) << 16;
                  std::memcpy(dst + 4 * d, &w, 4);
                }
              }
              if (t == 0) covered[(l * N + tok) * kvh + h]++;
            }
      }
  }
  for (char c : covered) ASSERT_EQ(c, 1) << "the test's ranks must cover every cell once";
  size_t bad = 0, first_bad = 0, nonzero = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i] && bad++ == 0) first_bad = i;
    nonzero += got[i] != 0;
  }
  EXPECT_EQ(bad, 0u) << "bytes differ, first at " << first_bad << " of " << got.size();
  // bf16 widened into fp32 leaves the low two bytes of every value zero: a quarter is the
  // bar there (H100 2026-12-07: 1,860,989 of 3,729,600 bytes non-zero, all bytes exact).
  EXPECT_GT(nonzero, got.size() / (f32 ? 4 : 2))
      << "the KV is mostly zero bytes: nothing was copied?";
  fs::remove_all(dir);
}

TEST(KvIpc, ThreeRanksToDecoderOnTheSameGpu) {
  REQUIRE_GPUS(1);
  run_handoff(0, 0);
}

TEST(KvIpc, Bf16SlicesWidenIntoAnFp32Region) {
  REQUIRE_GPUS(1);
  run_handoff(0, 0, /*f32=*/true);
}

// A rank killed after its layer 1 (of 4): the decoder fails the job as the senders' failure and
// frees the job's region at once; the other ranks' handoffs fail within the timeout with a
// line naming the decoder (never a hang).
TEST(KvIpc, RankKilledMidHandoffFailsTheJobAndFreesTheRegion) {
  REQUIRE_GPUS(1);
  const fs::path dir = fs::temp_directory_path() / ("kv_ipc_kill_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  // A 512 MiB region (32768 tokens x 8 KV heads x 128 x bf16 x K, V x 4 layers), so that
  // its release shows in cudaMemGetInfo.
  const std::vector<std::string> shape = {
      "--tokens",  "32768", "--layers",      "4",   "--kv-heads",   "8",    "--head-dim", "128",
      "--senders", "2",     "--page-tokens", "256", "--timeout-ms", "10000"};
  auto with = [&](std::vector<std::string> a, const std::vector<std::string>& more) {
    a.insert(a.end(), shape.begin(), shape.end());
    a.insert(a.end(), more.begin(), more.end());
    return a;
  };
  const std::string peer = KV_IPC_PEER, port_file = (dir / "port").string();
  const pid_t dec =
      spawn(with({peer, "decoder"}, {"--device", "0", "--port-file", port_file, "--out",
                                     (dir / "decoder.bin").string(), "--expect-failure", "1"}),
            (dir / "decoder.log").string());
  ASSERT_GT(dec, 0);
  std::string port;
  for (auto end = Clock::now() + std::chrono::seconds(60); port.empty() && Clock::now() < end;) {
    std::ifstream f(port_file);
    if (!(f >> port)) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_FALSE(port.empty()) << slurp((dir / "decoder.log").string());
  std::vector<pid_t> w;
  for (int r = 0; r < 2; ++r) {
    std::vector<std::string> more = {
        "--device", "0",
        "--port",   port,
        "--rank",   std::to_string(r),
        "--heads",  "0,1,2,3,4,5,6,7",
        "--ranges", r == 0 ? "0:16000" : "16000:32768",
        "--seed",   "5",
        "--out",    (dir / ("w" + std::to_string(r) + ".bin")).string()};
    if (r == 1) more.insert(more.end(), {"--die-after-layer", "1"});
    w.push_back(
        spawn(with({peer, "worker"}, more), (dir / ("w" + std::to_string(r) + ".log")).string()));
    ASSERT_GT(w.back(), 0);
  }
  const std::string log0 = (dir / "w0.log").string(), log1 = (dir / "w1.log").string();
  EXPECT_EQ(wait_exit(w[1], 60000), 3) << slurp(log1);
  const auto t0 = Clock::now();
  EXPECT_EQ(wait_exit(w[0], 60000), 1) << "the surviving rank must fail: " << slurp(log0);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 30.0);
  EXPECT_NE(slurp(log0).find("IPC KV handoff to decoder"), std::string::npos) << slurp(log0);
  const std::string dlog = (dir / "decoder.log").string();
  EXPECT_EQ(wait_exit(dec, 60000), 0) << slurp(dlog);
  EXPECT_NE(slurp(dlog).find("rank 1"), std::string::npos) << slurp(dlog);
  std::printf("%s%s%s", slurp(log0).c_str(), slurp(log1).c_str(), slurp(dlog).c_str());
  fs::remove_all(dir);
}

TEST(KvIpc, ThreeRanksToDecoderOnAnotherGpu) {
  REQUIRE_GPUS(2);
  run_handoff(1, 0);
}

}  // namespace
