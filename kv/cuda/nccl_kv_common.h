// Pieces shared by the two ends of the NCCL KV transport (kv/cuda/nccl_kv_sink.h,
// kv/cuda/nccl_kv_receiver.h): a 2-rank non-blocking NCCL communicator made with a
// deadline, bounded waits on a stream, and the device-side page checksum.
//
// Page checksum: NCCL pages never pass through host memory on the worker, so the
// header's crc32c (a host computation) cannot be filled there. Instead both ends compute
// kv_device_sum on the GPU — the worker on its exported slice, the decoder on its receive
// buffer — and the worker's value travels by ncclSend after the page; the decoder compares.
// kv_device_sum is sum_i w[i] * (2i + 1) mod 2^32 over the little-endian 32-bit words
// (a trailing partial word zero-padded): any change of one word, and any swap of two
// different words, changes it (odd weights are invertible mod 2^32). It is not crc32c.
#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace mprefill::ncclkv {

// Adds kv_device_sum(data, bytes) into *out (device memory; the caller zeroes it) on
// `stream`.
cudaError_t launch_device_sum(const void* data, size_t bytes, uint32_t* out, cudaStream_t stream);
// The same sum on the host (tests and diagnostics).
uint32_t host_sum(const void* data, size_t bytes);

// ncclCommInitRankConfig (non-blocking) on the current device, polled until ready or
// `timeout_ms` passes (then ncclCommAbort). Returns null and fills *error on failure.
ncclComm_t init_comm(const ncclUniqueId& id, int nranks, int rank, int timeout_ms,
                     std::string* error);

// Non-blocking NCCL calls may answer ncclInProgress: polls ncclCommGetAsyncError until
// settled. "" on success, else the error ("timed out after N ms" past the deadline).
std::string settle(ncclComm_t comm, ncclResult_t r, int timeout_ms);

// Waits until `stream` is idle, polling ncclCommGetAsyncError; past timeout_ms (or on an
// NCCL / CUDA error) returns the reason, and the caller aborts the communicator.
std::string wait_stream(ncclComm_t comm, cudaStream_t stream, int timeout_ms);

}  // namespace mprefill::ncclkv
