// One end of the "ipc" KV transport as its own process, for tests/ipc/kv_ipc_test.cc:
//   kv_ipc_peer decoder SHAPE --device N --port-file F --out F
//     a KV port (kv::KvReceiver with the ipc payload on GPU N) expecting job 7 of SHAPE from
//     --senders ranks; writes its port to F, waits for the job, writes the KV the job's
//     device region holds to --out ([layer][K, V][tokens][kv heads][head_dim] bf16), then
//     keeps its KV port up until --exit-file exists (at most 120 s).
//   kv_ipc_peer worker SHAPE --device N --port P --rank R --heads 0,2 --ranges 0:300,650:777
//                      --seed S --out F
//     random bf16 K / V of its heads and token ranges (std::mt19937 of seed, layer, rank) on
//     GPU N, handed to the decoder through kv::make_sender("ipc"); writes what it computed
//     to --out ([layer][K, V][rows][heads][head_dim], rows in range order).
//   decoder --expect-failure 1: the job must fail (a rank dies: worker --die-after-layer L)
//     and its device region be freed (cudaMemGetInfo before the job and after the failure).
//   SHAPE: --tokens N --layers L --kv-heads H --head-dim D --page-tokens P --senders S
//          [--contract bf16|f32] (f32: the decoder's region is fp32, the ranks' slices bf16)
// Exit status 0 on success, 1 with one error line on stderr.
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kv/kv_handoff.h"
#include "kv/kv_transport.h"

namespace {

using namespace mprefill;

struct Args {
  std::string role;
  int64_t tokens = 0;
  int layers = 0, kv_heads = 0, head_dim = 0, page_tokens = 0, senders = 1;
  int device = 0, port = 0, rank = 0, timeout_ms = 30000;
  uint64_t seed = 1;
  bool f32 = false;             // --contract f32: an fp32 KV contract (the slices stay bf16)
  int die_after = -1;           // worker: exit abruptly (no finish) after putting this layer
  bool expect_failure = false;  // decoder: the job must fail and its region be freed
  std::string port_file, out, exit_file;
  std::vector<int> heads;
  std::vector<std::pair<int64_t, int64_t>> ranges;
};

std::vector<std::string> split(const std::string& s, char c) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, c);) out.push_back(x);
  return out;
}

Args parse(int argc, char** argv) {
  if (argc < 2) throw std::runtime_error("usage: kv_ipc_peer decoder|worker FLAGS");
  Args a;
  a.role = argv[1];
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--tokens")
      a.tokens = std::stoll(v);
    else if (f == "--layers")
      a.layers = std::stoi(v);
    else if (f == "--kv-heads")
      a.kv_heads = std::stoi(v);
    else if (f == "--head-dim")
      a.head_dim = std::stoi(v);
    else if (f == "--page-tokens")
      a.page_tokens = std::stoi(v);
    else if (f == "--senders")
      a.senders = std::stoi(v);
    else if (f == "--device")
      a.device = std::stoi(v);
    else if (f == "--port")
      a.port = std::stoi(v);
    else if (f == "--rank")
      a.rank = std::stoi(v);
    else if (f == "--timeout-ms")
      a.timeout_ms = std::stoi(v);
    else if (f == "--seed")
      a.seed = std::stoull(v);
    else if (f == "--port-file")
      a.port_file = v;
    else if (f == "--contract")
      a.f32 = v == "f32";
    else if (f == "--exit-file")
      a.exit_file = v;
    else if (f == "--die-after-layer")
      a.die_after = std::stoi(v);
    else if (f == "--expect-failure")
      a.expect_failure = v == "1";
    else if (f == "--out")
      a.out = v;
    else if (f == "--heads")
      for (const auto& h : split(v, ',')) a.heads.push_back(std::stoi(h));
    else if (f == "--ranges")
      for (const auto& r : split(v, ',')) {
        const auto be = split(r, ':');
        a.ranges.emplace_back(std::stoll(be.at(0)), std::stoll(be.at(1)));
      }
    else
      throw std::runtime_error("unknown flag " + f);
  }
  return a;
}

v1::KvContract contract_of(const Args& a) {
  ModelFingerprint fp;
  fp.name = "ipc-test";
  fp.n_layers = a.layers;
  fp.n_kv_heads = a.kv_heads;
  fp.n_heads = 2 * a.kv_heads;
  fp.head_dim = a.head_dim;
  fp.hidden = fp.n_heads * a.head_dim;
  fp.vocab = 1000;
  fp.max_position = a.tokens + 16;
  fp.weights_digest = "0123456789abcdef0123456789abcdef";
  fp.kv_dtype = a.f32 ? DType::kF32 : DType::kBF16;
  return make_kv_contract(fp, a.page_tokens);
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

int run_decoder(const Args& a) {
  kv::ReceiverOptions ro;
  ro.contract = contract_of(a);
  ro.capacity_bytes = uint64_t{64} << 30;
  ro.default_timeout_ms = a.timeout_ms;
  ro.payload = kv::receiver_payloads(a.device);
  std::string failure;
  kv::KvReceiver rx(ro, [&](uint64_t, const std::string& m) { failure = m; });
  v1::Expect e;
  e.set_job_id(7);
  e.set_prompt_tokens(a.tokens);
  e.set_n_layers(a.layers);
  e.set_senders(a.senders);
  e.set_timeout_ms(a.timeout_ms);
  std::string why;
  size_t free0 = 0, total = 0;
  if (cudaSetDevice(a.device) != cudaSuccess || cudaMemGetInfo(&free0, &total) != cudaSuccess)
    throw std::runtime_error("cudaMemGetInfo failed");
  if (!rx.expect(e, &why)) throw std::runtime_error("expect: " + why);
  {
    const std::string tmp = a.port_file + ".tmp";
    std::ofstream(tmp) << rx.port() << "\n";
    std::rename(tmp.c_str(), a.port_file.c_str());
  }
  if (a.expect_failure) {
    // A rank died mid-handoff: the job fails naming it and its device region is freed at
    // once (measured: free device memory back to what it was before the job).
    if (rx.wait_complete(7, &why)) throw std::runtime_error("job 7 completed; expected a failure");
    std::printf("decoder: job 7 failed as expected: %s\n", why.c_str());
    const auto info = rx.info(7);
    if (!info.sender_failed) throw std::runtime_error("the failure is not counted as the senders'");
    if (rx.device_kv(7)) throw std::runtime_error("the failed job still holds its device KV");
    size_t free1 = 0;
    for (int i = 0; i < 100; ++i) {  // frees are synchronous; a few polls for the driver
      cudaMemGetInfo(&free1, &total);
      if (free1 + (size_t{8} << 20) >= free0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::printf(
        "decoder: device free before the job %zu, after its failure %zu (region was %llu)\n", free0,
        free1, static_cast<unsigned long long>(info.device_bytes));
    if (info.device_bytes == 0) throw std::runtime_error("no device region was ever allocated");
    if (free1 + (size_t{8} << 20) < free0)
      throw std::runtime_error("device memory not released after the failure");
    return 0;
  }
  if (!rx.wait_complete(7, &why)) throw std::runtime_error("job 7: " + why);
  auto dev = rx.device_kv(7);
  if (!dev) throw std::runtime_error("job 7 complete but holds no device KV");
  const size_t layer_bytes =
      static_cast<size_t>(a.tokens) * a.kv_heads * a.head_dim * (a.f32 ? 4 : 2);
  std::vector<char> out(2 * layer_bytes * a.layers);
  for (int l = 0; l < a.layers; ++l)
    dev->export_layer(l, out.data() + 2 * l * layer_bytes, out.data() + (2 * l + 1) * layer_bytes);
  write_file(a.out, out);
  const auto info = rx.info(7);
  std::printf("decoder: job 7 complete: %llu KV bytes, %llu device bytes, %.2f ms\n",
              static_cast<unsigned long long>(info.bytes),
              static_cast<unsigned long long>(dev->device_bytes()), info.receive_ms);
  std::fflush(stdout);
  // The KV port stays up until the test says the ranks are done (their last acks are sent
  // after the job completes here; closing at once could cut them off).
  for (int i = 0; i < 6000 && !a.exit_file.empty(); ++i) {
    if (std::ifstream(a.exit_file)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return 0;
}

int run_worker(const Args& a) {
  if (cudaSetDevice(a.device) != cudaSuccess) throw std::runtime_error("cudaSetDevice failed");
  cudaStream_t st;
  if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess)
    throw std::runtime_error("cudaStreamCreate failed");
  int64_t rows = 0;
  for (const auto& r : a.ranges) rows += r.second - r.first;
  const size_t n = static_cast<size_t>(rows) * a.heads.size() * a.head_dim;
  std::vector<char> all(2 * n * 2 * a.layers);
  void *dk = nullptr, *dv = nullptr;
  if (cudaMalloc(&dk, 2 * n) != cudaSuccess || cudaMalloc(&dv, 2 * n) != cudaSuccess)
    throw std::runtime_error("cudaMalloc failed");
  KvHandoffOptions o;
  o.job_id = 7;
  o.rank = a.rank;
  o.host = "127.0.0.1";
  o.port = static_cast<uint16_t>(a.port);
  o.contract = contract_of(a);
  o.timeout_ms = a.timeout_ms;
  kv::SenderSite site;
  site.device = a.device;
  site.device_kv = true;
  auto sender = kv::make_sender("ipc", o, site);
  for (int l = 0; l < a.layers; ++l) {
    std::mt19937_64 rng(a.seed * 1000003 + l * 101 + a.rank);
    std::normal_distribution<float> dist(0.f, 1.f);
    auto* k = reinterpret_cast<uint16_t*>(all.data() + 2 * l * 2 * n);
    auto* v = reinterpret_cast<uint16_t*>(all.data() + (2 * l + 1) * 2 * n);
    for (size_t i = 0; i < n; ++i) k[i] = f32_to_bf16(dist(rng));
    for (size_t i = 0; i < n; ++i) v[i] = f32_to_bf16(dist(rng));
    // Stream-ordered after the previous layer's copies out of the same buffers.
    cudaMemcpyAsync(dk, k, 2 * n, cudaMemcpyHostToDevice, st);
    cudaMemcpyAsync(dv, v, 2 * n, cudaMemcpyHostToDevice, st);
    KvSlice s;
    s.layer = l;
    s.kv_heads = a.heads;
    s.tokens = a.ranges;
    s.head_dim = a.head_dim;
    s.dtype = DType::kBF16;
    s.k = dk;
    s.v = dv;
    s.on_device = true;
    s.stream = st;
    sender->put(s);
    cudaStreamSynchronize(st);  // the host buffers of the next layer are rewritten
    if (l == a.die_after) {
      std::fprintf(stderr, "worker rank %d: dying after layer %d\n", a.rank, l);
      std::_Exit(3);  // no finish(), no cleanup: as a killed rank
    }
  }
  sender->finish();
  const auto stats = sender->stats();
  write_file(a.out, all);
  std::printf("worker rank %d: %llu bytes in %lld pages, copies %.3f ms, handoff %.2f ms\n", a.rank,
              static_cast<unsigned long long>(stats.bytes), static_cast<long long>(stats.pages),
              stats.send_ms, stats.handoff_ms);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    if (a.role == "decoder") return run_decoder(a);
    if (a.role == "worker") return run_worker(a);
    throw std::runtime_error("role must be decoder or worker, got '" + a.role + "'");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kv_ipc_peer %s: error: %s\n", argc > 1 ? argv[1] : "?", e.what());
    return 1;
  }
}
