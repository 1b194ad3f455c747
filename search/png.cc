#include "search/png.h"

#include <array>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace mprefill {
namespace {

constexpr uint8_t kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
constexpr size_t kMaxStored = 65535;  // bytes per stored deflate block

const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  return table;
}

void put_be32(std::vector<uint8_t>& out, uint32_t v) {
  out.push_back(static_cast<uint8_t>(v >> 24));
  out.push_back(static_cast<uint8_t>(v >> 16));
  out.push_back(static_cast<uint8_t>(v >> 8));
  out.push_back(static_cast<uint8_t>(v));
}

uint32_t get_be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

void put_chunk(std::vector<uint8_t>& out, const char type[4], const std::vector<uint8_t>& data) {
  put_be32(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_be32(out, png_crc32(out.data() + start, out.size() - start));
}

std::runtime_error png_error(const std::string& what) { return std::runtime_error("png: " + what); }

}  // namespace

uint32_t png_crc32(const uint8_t* data, size_t n, uint32_t crc) {
  const auto& t = crc_table();
  uint32_t c = crc ^ 0xffffffffu;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ data[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

uint32_t png_adler32(const uint8_t* data, size_t n) {
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < n; ++i) {
    a = (a + data[i]) % 65521u;
    b = (b + a) % 65521u;
  }
  return (b << 16) | a;
}

std::vector<uint8_t> encode_png(const RgbImage& img) {
  if (img.width <= 0 || img.height <= 0)
    throw png_error("image is empty (" + std::to_string(img.width) + " x " +
                    std::to_string(img.height) + ")");
  const size_t row = static_cast<size_t>(img.width) * 3;
  if (img.rgb.size() != row * img.height) throw png_error("pixel buffer size does not match");

  // Raw scanlines: filter byte 0, then the row.
  std::vector<uint8_t> raw;
  raw.reserve((row + 1) * img.height);
  for (int y = 0; y < img.height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), img.rgb.begin() + y * row, img.rgb.begin() + (y + 1) * row);
  }
  // zlib: CMF 0x78 (deflate, 32K window), FLG 0x01 (check bits: 0x7801 % 31 == 0).
  std::vector<uint8_t> z = {0x78, 0x01};
  for (size_t pos = 0; pos < raw.size() || pos == 0;) {
    const size_t len = std::min(kMaxStored, raw.size() - pos);
    const bool last = pos + len == raw.size();
    z.push_back(last ? 1 : 0);  // BFINAL, BTYPE 00 (stored)
    z.push_back(static_cast<uint8_t>(len));
    z.push_back(static_cast<uint8_t>(len >> 8));
    z.push_back(static_cast<uint8_t>(~len));
    z.push_back(static_cast<uint8_t>(~len >> 8));
    z.insert(z.end(), raw.begin() + pos, raw.begin() + pos + len);
    pos += len;
    if (last) break;
  }
  put_be32(z, png_adler32(raw.data(), raw.size()));

  std::vector<uint8_t> out(kSignature, kSignature + 8);
  std::vector<uint8_t> ihdr;
  put_be32(ihdr, static_cast<uint32_t>(img.width));
  put_be32(ihdr, static_cast<uint32_t>(img.height));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8-bit, truecolour, deflate, filter 0, no interlace
  put_chunk(out, "IHDR", ihdr);
  put_chunk(out, "IDAT", z);
  put_chunk(out, "IEND", {});
  return out;
}

void write_png(const std::string& path, const RgbImage& img) {
  const std::vector<uint8_t> bytes = encode_png(img);
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write " + path);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("write failed: " + path);
}

RgbImage decode_png_stored(const std::vector<uint8_t>& b) {
  if (b.size() < 8 || std::memcmp(b.data(), kSignature, 8) != 0) throw png_error("bad signature");
  size_t pos = 8;
  int width = 0, height = 0;
  bool seen_ihdr = false, seen_iend = false;
  std::vector<uint8_t> z;
  while (pos < b.size()) {
    if (b.size() - pos < 12)
      throw png_error("truncated chunk header at byte " + std::to_string(pos));
    const uint32_t len = get_be32(&b[pos]);
    if (len > b.size() - pos - 12) throw png_error("chunk length past end of file");
    const std::string type(reinterpret_cast<const char*>(&b[pos + 4]), 4);
    const uint8_t* data = &b[pos + 8];
    const uint32_t want = get_be32(&b[pos + 8 + len]);
    if (png_crc32(&b[pos + 4], len + 4) != want) throw png_error("CRC mismatch in chunk " + type);
    if (!seen_ihdr && type != "IHDR") throw png_error("first chunk is " + type + ", not IHDR");
    if (type == "IHDR") {
      if (len != 13) throw png_error("IHDR length " + std::to_string(len));
      width = static_cast<int>(get_be32(data));
      height = static_cast<int>(get_be32(data + 4));
      if (width <= 0 || height <= 0) throw png_error("IHDR size is zero");
      if (data[8] != 8 || data[9] != 2 || data[10] != 0 || data[11] != 0 || data[12] != 0)
        throw png_error("IHDR is not 8-bit RGB, deflate, filter 0, no interlace");
      seen_ihdr = true;
    } else if (type == "IDAT") {
      z.insert(z.end(), data, data + len);
    } else if (type == "IEND") {
      seen_iend = true;
      pos += 12 + len;
      break;
    }
    pos += 12 + len;
  }
  if (!seen_iend) throw png_error("no IEND chunk");
  if (pos != b.size()) throw png_error("bytes after IEND");
  if (z.size() < 6 || z[0] != 0x78 || ((z[0] << 8) | z[1]) % 31 != 0)
    throw png_error("bad zlib header");
  std::vector<uint8_t> raw;
  size_t p = 2;
  for (bool last = false; !last;) {
    if (p + 5 > z.size()) throw png_error("truncated deflate block");
    if ((z[p] & 0x06) != 0)
      throw png_error("deflate block is not stored (reader handles stored only)");
    last = z[p] & 1;
    const unsigned len = z[p + 1] | (z[p + 2] << 8);
    const unsigned nlen = z[p + 3] | (z[p + 4] << 8);
    if ((len ^ 0xffffu) != nlen) throw png_error("stored block LEN/NLEN mismatch");
    p += 5;
    if (p + len > z.size()) throw png_error("stored block past end of data");
    raw.insert(raw.end(), z.begin() + p, z.begin() + p + len);
    p += len;
  }
  if (p + 4 != z.size()) throw png_error("zlib stream length mismatch");
  if (png_adler32(raw.data(), raw.size()) != get_be32(&z[p])) throw png_error("Adler32 mismatch");
  const size_t row = static_cast<size_t>(width) * 3;
  if (raw.size() != (row + 1) * height) throw png_error("image data size does not match IHDR");
  RgbImage img(width, height);
  for (int y = 0; y < height; ++y) {
    if (raw[y * (row + 1)] != 0) throw png_error("row filter is not 0");
    std::memcpy(img.rgb.data() + y * row, raw.data() + y * (row + 1) + 1, row);
  }
  return img;
}

}  // namespace mprefill
