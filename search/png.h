// Minimal PNG writer/reader for diagnostic images (heatmaps): 8-bit RGB, no interlace,
// filter 0 on every row, zlib stream of stored (uncompressed) deflate blocks, CRC32 per
// chunk and Adler32 over the image data. No dependency; files are larger than a
// compressing writer's (3 bytes a pixel), which is fine at 256 x 256.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mprefill {

struct RgbImage {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // [height][width][3]
  RgbImage() = default;
  RgbImage(int w, int h) : width(w), height(h), rgb(static_cast<size_t>(w) * h * 3, 0) {}
  uint8_t* at(int x, int y) { return rgb.data() + (static_cast<size_t>(y) * width + x) * 3; }
  const uint8_t* at(int x, int y) const {
    return rgb.data() + (static_cast<size_t>(y) * width + x) * 3;
  }
};

// CRC-32 (ISO 3309, as PNG uses) and Adler-32 (zlib) of a byte range.
uint32_t png_crc32(const uint8_t* data, size_t n, uint32_t crc = 0);
uint32_t png_adler32(const uint8_t* data, size_t n);

// PNG file bytes of an image. Throws std::runtime_error on an empty or inconsistent image.
std::vector<uint8_t> encode_png(const RgbImage& img);
// Writes encode_png(img) to path; throws naming the path on failure.
void write_png(const std::string& path, const RgbImage& img);

// Reads back a PNG of the kind encode_png writes (8-bit RGB, stored deflate blocks):
// checks the signature, every chunk's CRC, IHDR fields, the zlib header, block lengths,
// Adler32 and the row filters. Throws std::runtime_error saying what is wrong. For tests
// and for tools that check their own output; not a general PNG decoder.
RgbImage decode_png_stored(const std::vector<uint8_t>& bytes);

}  // namespace mprefill
