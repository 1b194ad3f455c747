#include "kv/kv_transport.h"

#include <stdexcept>
#include <utility>
#ifdef MPREFILL_HAVE_NCCL
#include "kv/cuda/nccl_kv_receiver.h"
#include "kv/cuda/nccl_kv_sink.h"
#endif
#ifdef MPREFILL_HAVE_CUDA
#include "kv/cuda/ipc_kv_receiver.h"
#include "kv/cuda/ipc_kv_sink.h"
#endif

namespace mprefill::kv {

namespace {

// Sink S (TcpKvHandoff, gpu::NcclKvSink) behind the KvSender interface.
template <class S>
class SenderOf final : public KvSender {
 public:
  SenderOf(std::string name, std::unique_ptr<S> s) : name_(std::move(name)), s_(std::move(s)) {}
  void put(const KvSlice& slice) override { s_->put(slice); }
  void finish() override { s_->finish(); }
  bool takes_device_slices() const override { return s_->takes_device_slices(); }
  const std::string& transport() const override { return name_; }
  bool failed() const override { return s_->failed(); }
  std::string error() const override { return s_->error(); }
  KvHandoffStats stats() const override { return s_->stats(); }

 private:
  std::string name_;
  std::unique_ptr<S> s_;
};

#ifdef MPREFILL_HAVE_NCCL
constexpr bool kHaveNccl = true;
#else
constexpr bool kHaveNccl = false;
#endif
#ifdef MPREFILL_HAVE_CUDA
constexpr bool kHaveIpc = true;
#else
constexpr bool kHaveIpc = false;
#endif

std::string served_list() {
  std::string s = "tcp";
  if (kHaveNccl) s += ", nccl";
  if (kHaveIpc) s += ", ipc";
  return s;
}

}  // namespace

std::vector<std::string> sender_transports(const SenderSite& site) {
  std::vector<std::string> t{"tcp"};
  if (sender_refusal("nccl", site).empty()) t.push_back("nccl");
  if (sender_refusal("ipc", site).empty()) t.push_back("ipc");
  return t;
}

std::string sender_refusal(const std::string& transport, const SenderSite& site) {
  if (transport.empty() || transport == "tcp") return "";
  if (transport == "nccl") {
    if (!kHaveNccl)
      return "KV transport 'nccl' is not in this build (CUDA builds with NCCL); this build "
             "serves tcp";
    if (!site.device_kv)
      return "KV transport 'nccl' is not served by this group's executor (one --device cuda "
             "rank pairs its GPU with the decoder's); it hands KV off over tcp";
    return "";
  }
  if (transport == "ipc") {
    if (!kHaveIpc)
      return "KV transport 'ipc' is not in this build (CUDA builds); this build serves " +
             served_list();
    if (site.device < 0)
      return "KV transport 'ipc' copies device KV: this group's executor runs on the CPU; it hands "
             "KV off over tcp";
    return "";
  }
  return "KV transport '" + transport + "' is unknown (this build serves " + served_list() + ")";
}

std::unique_ptr<KvSender> make_sender(const std::string& transport, KvHandoffOptions opt,
                                      const SenderSite& site) {
  const std::string name = transport.empty() ? "tcp" : transport;
  const std::string refusal = sender_refusal(name, site);
  if (!refusal.empty()) throw std::runtime_error(refusal);
  try {
#ifdef MPREFILL_HAVE_NCCL
    if (name == "nccl")
      return std::make_unique<SenderOf<gpu::NcclKvSink>>(
          name, std::make_unique<gpu::NcclKvSink>(std::move(opt), site.device));
#endif
#ifdef MPREFILL_HAVE_CUDA
    if (name == "ipc")
      return std::make_unique<SenderOf<gpu::IpcKvSink>>(
          name, std::make_unique<gpu::IpcKvSink>(std::move(opt), site.device));
#endif
    return std::make_unique<SenderOf<TcpKvHandoff>>(name,
                                                    std::make_unique<TcpKvHandoff>(std::move(opt)));
  } catch (const std::exception& e) {
    throw std::runtime_error("KV transport '" + name + "' cannot be set up: " + e.what());
  }
}

std::map<std::string, PayloadSourceFactory> receiver_payloads(int device) {
  std::map<std::string, PayloadSourceFactory> m;
  if (device < 0) return m;
#ifdef MPREFILL_HAVE_NCCL
  m["nccl"] = make_nccl_payload_factory(device);
#endif
#ifdef MPREFILL_HAVE_CUDA
  m["ipc"] = make_ipc_payload_factory(device);
#endif
  if (m.empty())
    throw std::runtime_error(
        "--device cuda: this build of mprefill-decoder has no device KV transport (ipc and "
        "nccl need a CUDA build)");
  return m;
}

std::vector<std::string> receiver_transports(
    const std::map<std::string, PayloadSourceFactory>& payloads) {
  std::vector<std::string> t{"tcp"};
  for (const auto& [name, f] : payloads)
    if (name != "tcp") t.push_back(name);
  return t;
}

}  // namespace mprefill::kv
