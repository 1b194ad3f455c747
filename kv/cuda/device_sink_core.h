// What the two device-slice KV sinks (ipc_kv_sink.cc, nccl_kv_sink.cc) share on top of
// KvSinkCore: the rank's device, the decoder connection and its ack reader, the layer's
// device checksums, the CUDA events around each layer's work on the engine's stream, and
// the finish that waits for that stream and sums the layers' busy time. Not a public
// header; CUDA builds only.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/edge_check.h"
#include "kv/kv_ack.h"
#include "proto/wire.h"

namespace mprefill::gpu {

struct DeviceSinkCore : KvSinkCore {
  int device = 0;
  std::unique_ptr<wire::Connection> conn;
  std::thread reader;
  uint32_t* sums = nullptr;  // device: K, V checksum of each page of a layer
  size_t sums_cap = 0;       // pages
  cudaStream_t last_stream = nullptr;
  std::vector<cudaEvent_t> ev_begin, ev_end;  // [layer]: around the layer's work

  void close_connections() override {
    if (conn) conn->close();
  }

  // "KIND KV handoff to decoder H:P (job J, rank R, device D)": every error's prefix.
  static std::string where_of(const char* kind, const KvHandoffOptions& o, int device) {
    return std::string(kind) + " KV handoff to decoder " + o.host + ":" + std::to_string(o.port) +
           " (job " + std::to_string(o.job_id) + ", rank " + std::to_string(o.rank) + ", device " +
           std::to_string(device) + ")";
  }

  // On the sink's device: one begin / end event per layer. Throws (edge check).
  void create_layer_events() {
    ev_begin.assign(n_layers, nullptr);
    ev_end.assign(n_layers, nullptr);
    MPREFILL_EDGE_CHECK_CUDA(cudaSetDevice(device),
                             "cudaSetDevice(" + std::to_string(device) + ")");
    for (int l = 0; l < n_layers; ++l) {
      MPREFILL_EDGE_CHECK_CUDA(cudaEventCreate(&ev_begin[l]), "KV sink layer events");
      MPREFILL_EDGE_CHECK_CUDA(cudaEventCreate(&ev_end[l]), "KV sink layer events");
    }
  }

  // The first part of a sink's stop(): no more waiting, the connection closed, the ack
  // reader joined.
  void stop_reader() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    if (conn) conn->close();
    if (reader.joinable()) reader.join();
  }

  // The last part: the checksums and the layer events freed (the stream idle by then).
  void free_device_state() {
    if (sums) cudaFree(sums);
    sums = nullptr;
    sums_cap = 0;
    for (auto e : ev_begin)
      if (e) cudaEventDestroy(e);
    for (auto e : ev_end)
      if (e) cudaEventDestroy(e);
    ev_begin.clear();
    ev_end.clear();
  }

  // finish(): every layer's ack (bounded), then the stream idle (wait_idle: "" or why,
  // bounded) so that the events can be read: st.send_ms = the layers' busy time on the
  // stream. stop() then runs; a failure is thrown after it.
  void finish_layers(const std::function<std::string(cudaStream_t)>& wait_idle,
                     const std::function<void()>& stop) {
    await_acks();
    if (!has_failed() && last_stream) {
      cudaSetDevice(device);
      const std::string w = wait_idle(last_stream);
      if (!w.empty()) {
        fail("finish: " + w);
      } else {
        double busy = 0;
        for (int l = 0; l < n_layers; ++l) {
          float ms = 0;
          if (cudaEventElapsedTime(&ms, ev_begin[l], ev_end[l]) == cudaSuccess) busy += ms;
        }
        std::lock_guard<std::mutex> lock(mu);
        st.send_ms = busy;
      }
    }
    const bool failed_now = has_failed();
    stop();
    if (failed_now) throw std::runtime_error(error_message());
  }
};

}  // namespace mprefill::gpu
