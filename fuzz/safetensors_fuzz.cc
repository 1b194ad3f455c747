// libFuzzer target: a .safetensors file (u64 header length, JSON header, data section) as
// model/safetensors.h opens it. The input becomes the contents of an in-memory file
// (memfd) that SafetensorsFile::open maps exactly as it maps a checkpoint on disk, so the
// fuzzed path is the real one (size checks, mmap, header JSON, dtype / shape /
// data_offsets validation) with no change to the reader.
//
// For a file that opens, every tensor must lie inside the mapping and have
// numel * dtype bytes; the small ones are read to fp32 in full and through a row / column
// slice picked from the input (refused slices must throw, never read out of range), and
// F32 data must equal the raw bytes.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/safetensors.h"

namespace {

[[noreturn]] void violated(const char* what) {
  std::fprintf(stderr, "safetensors_fuzz: invariant violated: %s\n", what);
  std::abort();
}
#define FUZZ_CHECK(cond)          \
  do {                            \
    if (!(cond)) violated(#cond); \
  } while (0)

constexpr int64_t kMaxReadElems = int64_t{1} << 16;

// One memfd reused for every input (truncated and rewritten each time).
int memfd() {
  static int fd = [] {
    const int f = ::memfd_create("safetensors_fuzz", 0);
    if (f < 0) {
      std::perror("safetensors_fuzz: memfd_create");
      std::abort();
    }
    return f;
  }();
  return fd;
}

void write_all(int fd, const uint8_t* p, size_t n) {
  if (::ftruncate(fd, 0) != 0 || ::lseek(fd, 0, SEEK_SET) != 0) std::abort();
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w <= 0) std::abort();
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The last byte (when there are more than 8) picks the slice; the file is all bytes.
  const uint8_t pick = size > 8 ? data[size - 1] : 0;
  const int fd = memfd();
  write_all(fd, data, size);
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  mprefill::SafetensorsFile f;
  try {
    f.open(path);
  } catch (const std::runtime_error& e) {
    FUZZ_CHECK(std::strlen(e.what()) > 0);
    FUZZ_CHECK(!f.is_open());
    return 0;
  }
  FUZZ_CHECK(f.is_open());
  for (const std::string& name : f.names()) {
    const mprefill::TensorInfo& ti = f.info(name);
    const int64_t numel = ti.numel();
    FUZZ_CHECK(numel >= 0);
    FUZZ_CHECK(ti.nbytes == static_cast<uint64_t>(numel) * mprefill::dtype_size(ti.dtype));
    FUZZ_CHECK(ti.offset >= 8 && ti.offset <= size && ti.nbytes <= size - ti.offset);
    FUZZ_CHECK(f.raw(name) == f.raw(name));  // lookup is stable
    if (numel > kMaxReadElems) continue;
    std::vector<float> all(static_cast<size_t>(numel) + 1);
    f.read_f32(name, all.data());
    if (ti.dtype == mprefill::DType::kF32 && numel > 0) {
      float first;
      std::memcpy(&first, data + ti.offset, 4);
      FUZZ_CHECK(std::memcmp(&first, all.data(), 4) == 0);
    }
    // A slice inside or just outside the shape.
    mprefill::RowSlice rows;
    mprefill::ColSlice cols;
    if (!ti.shape.empty() && (pick & 1)) {
      rows.row0 = (pick >> 1) % (ti.shape[0] + 2);
      rows.rows = static_cast<int64_t>((pick >> 3) % (ti.shape[0] + 2)) - 1;
    }
    if (ti.shape.size() >= 2 && (pick & 2)) {
      cols.col0 = (pick >> 2) % (ti.shape[1] + 2);
      cols.cols = static_cast<int64_t>((pick >> 4) % (ti.shape[1] + 2)) - 1;
    }
    std::vector<int64_t> out;
    try {
      out = mprefill::sliced_shape(ti, rows, cols);
    } catch (const std::runtime_error&) {
      // A refused slice: read_f32 must refuse it too, before touching dst.
      float sink[1];
      bool threw = false;
      try {
        f.read_f32(name, sink, rows, cols);
      } catch (const std::runtime_error&) {
        threw = true;
      }
      FUZZ_CHECK(threw);
      continue;
    }
    int64_t n = 1;
    for (int64_t d : out) {
      FUZZ_CHECK(d >= 0);
      n *= d;
    }
    FUZZ_CHECK(n <= numel);
    std::vector<float> part(static_cast<size_t>(n) + 1);
    f.read_f32(name, part.data(), rows, cols);
  }
  return 0;
}
