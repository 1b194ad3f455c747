#include "kv/kv_page_frame.h"

#include <cstdint>

namespace mprefill::kv {
namespace {

// Protobuf wire reading over [p, end): false at a malformed or truncated field.
struct Reader {
  const unsigned char* p;
  const unsigned char* end;

  bool varint(uint64_t* out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
      const unsigned char b = *p++;
      v |= uint64_t{b & 0x7fu} << shift;
      if (!(b & 0x80)) {
        *out = v;
        return true;
      }
    }
    return false;
  }
  // A length-delimited field's bytes.
  bool bytes(std::string_view* out) {
    uint64_t n = 0;
    if (!varint(&n) || n > static_cast<uint64_t>(end - p)) return false;
    *out = std::string_view(reinterpret_cast<const char*>(p), n);
    p += n;
    return true;
  }
};

}  // namespace

bool read_kv_page_frame(std::string_view envelope, KvPageView* out) {
  Reader r{reinterpret_cast<const unsigned char*>(envelope.data()),
           reinterpret_cast<const unsigned char*>(envelope.data()) + envelope.size()};
  bool have_version = false, have_page = false;
  std::string_view page;
  while (r.p < r.end) {
    uint64_t tag = 0;
    if (!r.varint(&tag)) return false;
    if (tag == (1 << 3 | 0) && !have_version) {  // version
      uint64_t v = 0;
      if (!r.varint(&v) || v != wire::kProtocolVersion) return false;
      have_version = true;
    } else if (tag == (35 << 3 | 2) && !have_page) {  // kv_page
      if (!r.bytes(&page)) return false;
      have_page = true;
    } else {
      return false;
    }
  }
  if (!have_version || !have_page) return false;
  Reader q{reinterpret_cast<const unsigned char*>(page.data()),
           reinterpret_cast<const unsigned char*>(page.data()) + page.size()};
  bool h = false, k = false, v = false;
  std::string_view hb;
  while (q.p < q.end) {
    uint64_t tag = 0;
    if (!q.varint(&tag)) return false;
    if (tag == (1 << 3 | 2) && !h) {
      if (!q.bytes(&hb)) return false;
      h = true;
    } else if (tag == (2 << 3 | 2) && !k) {
      if (!q.bytes(&out->k)) return false;
      k = true;
    } else if (tag == (3 << 3 | 2) && !v) {
      if (!q.bytes(&out->v)) return false;
      v = true;
    } else {
      return false;
    }
  }
  if (!h) return false;
  if (!k) out->k = {};
  if (!v) out->v = {};
  return out->header.ParseFromArray(hb.data(), static_cast<int>(hb.size()));
}

}  // namespace mprefill::kv
