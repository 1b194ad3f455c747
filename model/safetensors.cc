#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

#include "kernels/cpu/parallel.h"

namespace mprefill {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; big-endian hosts are not supported");

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

// Safetensors dtype names we accept; everything else is refused by name.
bool parse_dtype(const std::string& s, DType* out) {
  if (s == "F32") {
    *out = DType::kF32;
    return true;
  }
  if (s == "BF16") {
    *out = DType::kBF16;
    return true;
  }
  if (s == "F16") {
    *out = DType::kF16;
    return true;
  }
  return false;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    default:
      return "?";
  }
}

// numel of a shape; false on overflow past int64 or a negative dim.
bool checked_numel(const std::vector<int64_t>& shape, int64_t* out) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return false;
    n *= d;
  }
  *out = n;
  return true;
}

// n elements of type t at src (unaligned, little-endian) -> fp32 dst.
void convert_run(DType t, const uint8_t* src, float* dst, int64_t n) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      return;
    default:
      return;  // unreachable: the reader only accepts F32/BF16/F16
  }
}

// fp32 src -> n elements of type t at dst.
void encode_run(DType t, const float* src, uint8_t* dst, int64_t n) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = f32_to_bf16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = f32_to_f16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    default:
      return;  // unreachable: the writer only accepts F32/BF16/F16
  }
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open " + path + ": " + std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail("cannot read " + path);
  return ss.str();
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::vector<int64_t> sliced_shape(const TensorInfo& info, RowSlice rows, ColSlice cols) {
  const bool row_sliced = rows.row0 != 0 || rows.rows >= 0;
  const bool col_sliced = cols.col0 != 0 || cols.cols >= 0;
  std::vector<int64_t> s = info.shape;
  if (row_sliced) {
    if (s.empty()) fail("tensor " + info.name + ": row slice of a scalar");
    const int64_t n = rows.rows < 0 ? s[0] - rows.row0 : rows.rows;
    if (rows.row0 < 0 || n < 0 || rows.row0 + n > s[0])
      fail("tensor " + info.name + " " + shape_to_string(info.shape) + ": row slice [" +
           std::to_string(rows.row0) + ", " + std::to_string(rows.row0 + n) + ") out of range");
    s[0] = n;
  }
  if (col_sliced) {
    if (s.size() < 2) fail("tensor " + info.name + ": column slice of a tensor with < 2 dims");
    const int64_t n = cols.cols < 0 ? s[1] - cols.col0 : cols.cols;
    if (cols.col0 < 0 || n < 0 || cols.col0 + n > s[1])
      fail("tensor " + info.name + " " + shape_to_string(info.shape) + ": column slice [" +
           std::to_string(cols.col0) + ", " + std::to_string(cols.col0 + n) + ") out of range");
    s[1] = n;
  }
  return s;
}

// ------------------------------------------------------------------ SafetensorsFile

SafetensorsFile::~SafetensorsFile() { close(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept { *this = std::move(o); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    close();
    path_ = std::move(o.path_);
    base_ = o.base_;
    size_ = o.size_;
    tensors_ = std::move(o.tensors_);
    metadata_ = std::move(o.metadata_);
    o.base_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

void SafetensorsFile::close() {
  if (base_) ::munmap(base_, size_);
  base_ = nullptr;
  size_ = 0;
  tensors_.clear();
  metadata_.clear();
}

void SafetensorsFile::open(const std::string& path) {
  close();
  path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open safetensors file " + path + ": " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail("cannot stat " + path + ": " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("safetensors path " + path + " is not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail("truncated safetensors file " + path + ": " + std::to_string(size) +
         " bytes, less than the 8-byte header length");
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (p == MAP_FAILED) fail("cannot mmap " + path + ": " + std::strerror(map_errno));
  base_ = static_cast<uint8_t*>(p);
  size_ = size;

  try {
    uint64_t hlen;
    std::memcpy(&hlen, base_, 8);
    if (hlen > size - 8)
      fail("truncated safetensors file " + path + ": header length " + std::to_string(hlen) +
           " exceeds the " + std::to_string(size - 8) + " bytes after the length field");
    json header;
    try {
      header = json::parse(base_ + 8, base_ + 8 + hlen);
    } catch (const json::exception& e) {
      fail("corrupt JSON header in safetensors file " + path + ": " + e.what());
    }
    if (!header.is_object())
      fail("corrupt JSON header in safetensors file " + path + ": not a JSON object");
    const uint64_t data_start = 8 + hlen;
    const uint64_t data_size = size - data_start;

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object())
          fail("corrupt JSON header in safetensors file " + path +
               ": __metadata__ is not an object");
        for (auto m = v.begin(); m != v.end(); ++m)
          metadata_[m.key()] =
              m.value().is_string() ? m.value().get<std::string>() : m.value().dump();
        continue;
      }
      const std::string where = "tensor " + name + " in " + path;
      if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
          !v.contains("data_offsets"))
        fail("corrupt header entry for " + where + ": needs dtype, shape and data_offsets");
      TensorInfo ti;
      ti.name = name;
      if (!v["dtype"].is_string())
        fail("corrupt header entry for " + where + ": dtype is not a string");
      const std::string dt = v["dtype"].get<std::string>();
      if (!parse_dtype(dt, &ti.dtype))
        fail(where + " has unsupported dtype " + dt + " (supported: BF16, F16, F32)");
      const json& sh = v["shape"];
      if (!sh.is_array()) fail("corrupt header entry for " + where + ": shape is not an array");
      for (const json& d : sh) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0)
          fail("corrupt header entry for " + where + ": shape " + sh.dump() +
               " has a non-integer or negative dim");
        ti.shape.push_back(d.get<int64_t>());
      }
      int64_t numel;
      if (!checked_numel(ti.shape, &numel) ||
          numel > std::numeric_limits<int64_t>::max() / dtype_size(ti.dtype))
        fail("corrupt header entry for " + where + ": shape " + sh.dump() + " is too large");
      const json& off = v["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
          !off[1].is_number_unsigned())
        fail("corrupt header entry for " + where + ": data_offsets must be [begin, end]");
      const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
      if (b > e || e > data_size)
        fail("bad data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "] for " +
             where + ": data section has " + std::to_string(data_size) +
             " bytes (truncated or corrupt file)");
      const uint64_t want = static_cast<uint64_t>(numel) * dtype_size(ti.dtype);
      if (e - b != want)
        fail("bad data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "] for " +
             where + ": span of " + std::to_string(e - b) + " bytes, but " + dt + " " +
             shape_to_string(ti.shape) + " needs " + std::to_string(want));
      ti.offset = data_start + b;
      ti.nbytes = want;
      tensors_.emplace(name, std::move(ti));
    }
  } catch (...) {
    close();
    throw;
  }
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("tensor " + name + " not found in " + path_);
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> v;
  v.reserve(tensors_.size());
  for (const auto& kv : tensors_) v.push_back(kv.first);
  std::sort(v.begin(), v.end());
  return v;
}

const uint8_t* SafetensorsFile::raw(const std::string& name) const {
  return base_ + info(name).offset;
}

void SafetensorsFile::read_f32(const std::string& name, float* dst, RowSlice rows,
                               ColSlice cols) const {
  const TensorInfo& ti = info(name);
  const std::vector<int64_t> out = sliced_shape(ti, rows, cols);
  const uint8_t* src = base_ + ti.offset;
  const int es = dtype_size(ti.dtype);
  const DType dt = ti.dtype;
  constexpr int64_t kGrain = 1 << 16;  // elements per parallel chunk, at least

  const size_t nd = ti.shape.size();
  const int64_t d0 = nd >= 1 ? ti.shape[0] : 1;
  const int64_t d1 = nd >= 2 ? ti.shape[1] : 1;
  int64_t inner = 1;
  for (size_t i = 2; i < nd; ++i) inner *= ti.shape[i];
  const int64_t row0 = nd >= 1 ? rows.row0 : 0, nr = nd >= 1 ? out[0] : 1;
  const int64_t col0 = nd >= 2 ? cols.col0 : 0, nc = nd >= 2 ? out[1] : 1;
  (void)d0;

  if (nc == d1) {
    // Rows [row0, row0 + nr) are one contiguous run.
    const int64_t total = nr * d1 * inner;
    const uint8_t* base = src + row0 * d1 * inner * es;
    cpu::parallel_for(total, kGrain, [&](int64_t b, int64_t e) {
      convert_run(dt, base + b * es, dst + b, e - b);
    });
    return;
  }
  const int64_t run = nc * inner;  // contiguous elements per row
  cpu::parallel_for(nr, std::max<int64_t>(1, kGrain / std::max<int64_t>(run, 1)),
                    [&](int64_t b, int64_t e) {
                      for (int64_t r = b; r < e; ++r) {
                        const uint8_t* s = src + (((row0 + r) * d1 + col0) * inner) * es;
                        convert_run(dt, s, dst + r * run, run);
                      }
                    });
}

// ------------------------------------------------------------------ checkpoint

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& path) : location_(path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) fail("checkpoint path " + path + " does not exist");
  if (fs::is_regular_file(st)) {
    files_.push_back(std::make_unique<SafetensorsFile>(path));
    for (const std::string& n : files_[0]->names()) route_[n] = 0;
    return;
  }
  if (!fs::is_directory(st)) fail("checkpoint path " + path + " is neither a file nor a directory");

  const fs::path dir(path);
  const fs::path index = dir / "model.safetensors.index.json";
  const fs::path single = dir / "model.safetensors";
  if (fs::exists(index)) {
    const std::string text = read_text_file(index.string());
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      fail("corrupt JSON in " + index.string() + ": " + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail("corrupt index " + index.string() + ": no \"weight_map\" object");
    std::map<std::string, size_t> file_ix;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        fail("corrupt index " + index.string() + ": weight_map entry for " + it.key() +
             " is not a file name");
      const std::string fname = it.value().get<std::string>();
      auto f = file_ix.find(fname);
      if (f == file_ix.end()) {
        const fs::path shard = dir / fname;
        if (!fs::exists(shard))
          fail("shard " + shard.string() + " listed in " + index.string() + " does not exist");
        files_.push_back(std::make_unique<SafetensorsFile>(shard.string()));
        f = file_ix.emplace(fname, files_.size() - 1).first;
      }
      if (!files_[f->second]->has(it.key()))
        fail("index " + index.string() + " maps tensor " + it.key() + " to " +
             files_[f->second]->path() + ", which has no such tensor");
      route_[it.key()] = f->second;
    }
    return;
  }
  if (fs::exists(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const std::string& n : files_[0]->names()) route_[n] = 0;
    return;
  }
  fail("no model.safetensors or model.safetensors.index.json in " + path);
}

const SafetensorsFile& SafetensorsCheckpoint::file_of(const std::string& name) const {
  auto it = route_.find(name);
  if (it == route_.end()) fail("tensor " + name + " not found in " + location_);
  return *files_[it->second];
}

const TensorInfo& SafetensorsCheckpoint::info(const std::string& name) const {
  return file_of(name).info(name);
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> v;
  v.reserve(route_.size());
  for (const auto& kv : route_) v.push_back(kv.first);
  std::sort(v.begin(), v.end());
  return v;
}

void SafetensorsCheckpoint::read_f32(const std::string& name, float* dst, RowSlice rows,
                                     ColSlice cols) const {
  file_of(name).read_f32(name, dst, rows, cols);
}

Tensor SafetensorsCheckpoint::load(const std::string& name, const std::vector<int64_t>& expected,
                                   RowSlice rows, ColSlice cols) const {
  const SafetensorsFile& f = file_of(name);
  const TensorInfo& ti = f.info(name);
  if (ti.shape != expected)
    fail("tensor " + name + " in " + f.path() + ": expected " + shape_to_string(expected) +
         ", file has " + shape_to_string(ti.shape));
  Tensor t;
  t.shape = sliced_shape(ti, rows, cols);
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  t.data.resize(static_cast<size_t>(n));
  f.read_f32(name, t.data.data(), rows, cols);
  return t;
}

// ------------------------------------------------------------------ writer

namespace {

// FILE* that removes its temp path unless committed.
struct TmpFile {
  std::string tmp, final_path;
  FILE* f = nullptr;
  bool committed = false;
  explicit TmpFile(const std::string& path) : tmp(path + ".tmp"), final_path(path) {
    f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail("cannot create " + tmp + ": " + std::strerror(errno));
  }
  ~TmpFile() {
    if (f) std::fclose(f);
    if (!committed) std::remove(tmp.c_str());
  }
  void write(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f) != n)
      fail("write to " + tmp + " failed: " + std::strerror(errno));
  }
  void commit() {
    if (std::fflush(f) != 0 || ::fsync(::fileno(f)) != 0)
      fail("write to " + tmp + " failed: " + std::strerror(errno));
    const int rc = std::fclose(f);
    f = nullptr;
    if (rc != 0) fail("write to " + tmp + " failed: " + std::strerror(errno));
    if (std::rename(tmp.c_str(), final_path.c_str()) != 0)
      fail("cannot rename " + tmp + " to " + final_path + ": " + std::strerror(errno));
    committed = true;
  }
};

}  // namespace

void write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) {
    json m = json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    header["__metadata__"] = m;
  }
  std::set<std::string> seen;
  uint64_t off = 0;
  for (const SafetensorsEntry& e : entries) {
    if (e.name.empty() || e.name == "__metadata__")
      fail("write_safetensors " + path + ": invalid tensor name '" + e.name + "'");
    if (e.dtype != DType::kF32 && e.dtype != DType::kBF16 && e.dtype != DType::kF16)
      fail("write_safetensors " + path + ": tensor " + e.name + " has unsupported dtype " +
           to_string(e.dtype) + " (F32, BF16 or F16)");
    if (!seen.insert(e.name).second)
      fail("write_safetensors " + path + ": duplicate tensor name " + e.name);
    int64_t numel;
    if (!checked_numel(e.shape, &numel))
      fail("write_safetensors " + path + ": tensor " + e.name + " has a bad shape " +
           shape_to_string(e.shape));
    if (numel > 0 && !e.data)
      fail("write_safetensors " + path + ": tensor " + e.name + " has no data");
    const uint64_t nbytes = static_cast<uint64_t>(numel) * dtype_size(e.dtype);
    header[e.name] = {
        {"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {off, off + nbytes}}};
    off += nbytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  const uint64_t hlen = h.size();

  TmpFile out(path);
  out.write(&hlen, 8);
  out.write(h.data(), h.size());
  constexpr int64_t kChunk = 1 << 20;  // elements per encode buffer
  std::vector<uint8_t> buf;
  for (const SafetensorsEntry& e : entries) {
    int64_t numel = 1;
    for (int64_t d : e.shape) numel *= d;
    const int es = dtype_size(e.dtype);
    for (int64_t i = 0; i < numel; i += kChunk) {
      const int64_t n = std::min(kChunk, numel - i);
      buf.resize(static_cast<size_t>(n) * es);
      encode_run(e.dtype, e.data + i, buf.data(), n);
      out.write(buf.data(), buf.size());
    }
  }
  out.commit();
}

void write_file_atomic(const std::string& path, const std::string& text) {
  TmpFile out(path);
  out.write(text.data(), text.size());
  out.commit();
}

}  // namespace mprefill
