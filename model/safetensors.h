// Safetensors checkpoints: a memory-mapped reader (single file or sharded through
// model.safetensors.index.json) that converts BF16/F16/F32 to fp32, optionally reading
// only a row range (dim 0) and/or a column range (dim 1) for tensor parallelism, and an
// atomic writer.
//
// File layout: u64 little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {str: str}}, then the data section; offsets are relative to the
// data section (byte 8 + N of the file).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/types.h"
#include "model/weights.h"

namespace mprefill {

// Columns [col0, col0 + cols) of dim 1 of a tensor with >= 2 dims.
struct ColSlice {
  int64_t col0 = 0, cols = -1;  // cols < 0: all
};

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // byte offset of the first element from the start of the file
  uint64_t nbytes = 0;  // numel * dtype_size
  int64_t numel() const;
};

// "[288, 768]"
std::string shape_to_string(const std::vector<int64_t>& shape);

// Shape of info after applying the slices (validated; throws naming the tensor).
std::vector<int64_t> sliced_shape(const TensorInfo& info, RowSlice rows, ColSlice cols);

// One .safetensors file, mapped read-only for the lifetime of the object.
class SafetensorsFile {
 public:
  SafetensorsFile() = default;
  explicit SafetensorsFile(const std::string& path) { open(path); }
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile(SafetensorsFile&& o) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& o) noexcept;

  // Maps and validates the file. Throws std::runtime_error naming the file (and tensor).
  void open(const std::string& path);
  void close();
  bool is_open() const { return base_ != nullptr; }

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  // Throws "tensor NAME not found in PATH".
  const TensorInfo& info(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Raw little-endian bytes of a tensor (not necessarily aligned).
  const uint8_t* raw(const std::string& name) const;

  // dst receives the sliced tensor, row-major: [rows][cols][inner dims...], in fp32.
  void read_f32(const std::string& name, float* dst, RowSlice rows = {}, ColSlice cols = {}) const;

 private:
  std::string path_;
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::unordered_map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: model.safetensors.index.json (sharded) if present, else
// model.safetensors. A path to a single .safetensors file is accepted too.
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::string& path);

  const std::string& location() const { return location_; }
  bool has(const std::string& name) const { return route_.count(name) != 0; }
  // Throws "tensor NAME not found in LOCATION".
  const TensorInfo& info(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  size_t num_files() const { return files_.size(); }

  void read_f32(const std::string& name, float* dst, RowSlice rows = {}, ColSlice cols = {}) const;
  // Reads a tensor into fp32 after checking its full shape equals `expected`
  // ("tensor NAME in FILE: expected [768, 288], file has [288, 768]").
  Tensor load(const std::string& name, const std::vector<int64_t>& expected, RowSlice rows = {},
              ColSlice cols = {}) const;

 private:
  const SafetensorsFile& file_of(const std::string& name) const;
  std::string location_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, size_t> route_;  // tensor name -> index into files_
};

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;  // stored type; data is converted from fp32
  std::vector<int64_t> shape;
  const float* data = nullptr;  // numel(shape) values, row-major
};

// Writes a .safetensors file with __metadata__ {"format": "pt"} and the header padded
// with spaces to a multiple of 8 bytes. Data is laid out in entry order. Atomic: writes
// PATH.tmp, then renames it over PATH. Throws naming the path on I/O errors.
void write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Writes text to PATH.tmp then renames it over PATH.
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace mprefill
