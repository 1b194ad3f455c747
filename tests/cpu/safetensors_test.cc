// Safetensors reader/writer: round trips (F32, BF16, F16; row and column slices),
// hand-built corrupt files, sharded checkpoints.
#include "model/safetensors.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "tests/testutil.h"

namespace mprefill {

// Test names and failure messages print the dtype by name.
void PrintTo(DType t, std::ostream* os) { *os << to_string(t); }

namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::expect_one_line_containing;
using test::TempDir;

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good());
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A raw safetensors file: u64 header length, header text as given (no padding), data.
std::string raw_file(const std::string& header, const std::string& data, int64_t hlen = -1) {
  const uint64_t n = hlen < 0 ? header.size() : static_cast<uint64_t>(hlen);
  std::string s(8, '\0');
  std::memcpy(s.data(), &n, 8);
  return s + header + data;
}

float round_trip(DType t, float x) {
  switch (t) {
    case DType::kBF16:
      return bf16_to_f32(f32_to_bf16(x));
    case DType::kF16:
      return f16_to_f32(f32_to_f16(x));
    default:
      return x;
  }
}

// Reference slice of a [d0][d1][inner] tensor.
std::vector<float> slice_ref(const std::vector<float>& x, int64_t d1, int64_t inner, int64_t r0,
                             int64_t nr, int64_t c0, int64_t nc, DType t) {
  std::vector<float> out;
  for (int64_t r = r0; r < r0 + nr; ++r)
    for (int64_t c = c0; c < c0 + nc; ++c)
      for (int64_t k = 0; k < inner; ++k) out.push_back(round_trip(t, x[(r * d1 + c) * inner + k]));
  return out;
}

void expect_bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  size_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += std::memcmp(&a[i], &b[i], 4) != 0;
  EXPECT_EQ(bad, 0u) << "of " << a.size();
}

class RoundTrip : public ::testing::TestWithParam<DType> {};

TEST_P(RoundTrip, FullAndSlicedReads) {
  const DType t = GetParam();
  TempDir dir;
  const auto a = test::random_normal(37 * 53, 1);         // [37, 53]
  const auto b = test::random_uniform(5, 2, 3.f);         // [5]
  const auto c = test::random_normal(13 * 7 * 11, 3, 2);  // [13, 7, 11]
  const float s = 0.7131f;                                // scalar []
  const std::string path = dir.file("x.safetensors");
  write_safetensors(path, {{"a", t, {37, 53}, a.data()},
                           {"b.bias", t, {5}, b.data()},
                           {"c", t, {13, 7, 11}, c.data()},
                           {"s", t, {}, &s},
                           {"empty", t, {0, 4}, nullptr}});
  EXPECT_FALSE(test::file_exists(path + ".tmp"));

  // Header: length multiple of 8, padded with spaces, metadata format pt.
  const std::string bytes = read_bytes(path);
  uint64_t hlen;
  std::memcpy(&hlen, bytes.data(), 8);
  EXPECT_EQ(hlen % 8, 0u);
  const auto header = nlohmann::json::parse(bytes.substr(8, hlen));
  EXPECT_EQ(header["__metadata__"]["format"], "pt");

  SafetensorsFile f(path);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b.bias", "c", "empty", "s"}));
  EXPECT_EQ(f.info("a").dtype, t);
  EXPECT_EQ(f.info("a").shape, (std::vector<int64_t>{37, 53}));
  EXPECT_EQ(f.info("c").nbytes, static_cast<uint64_t>(13 * 7 * 11 * dtype_size(t)));
  EXPECT_EQ(bytes.size(), 8 + hlen + (37 * 53 + 5 + 13 * 7 * 11 + 1) * dtype_size(t));

  std::vector<float> out(37 * 53);
  f.read_f32("a", out.data());
  expect_bits_equal(out, slice_ref(a, 53, 1, 0, 37, 0, 53, t));
  out.assign(5, 0);
  f.read_f32("b.bias", out.data());
  expect_bits_equal(out, slice_ref(b, 1, 1, 0, 5, 0, 1, t));
  out.assign(1, 0);
  f.read_f32("s", out.data());
  EXPECT_EQ(out[0], round_trip(t, s));

  // Rows [11, 28) of a; columns [17, 46) of a; both; the tail rows with rows = -1.
  out.assign(17 * 53, 0);
  f.read_f32("a", out.data(), {11, 17});
  expect_bits_equal(out, slice_ref(a, 53, 1, 11, 17, 0, 53, t));
  out.assign(37 * 29, 0);
  f.read_f32("a", out.data(), {}, {17, 29});
  expect_bits_equal(out, slice_ref(a, 53, 1, 0, 37, 17, 29, t));
  out.assign(5 * 3, 0);
  f.read_f32("a", out.data(), {31, 5}, {50, 3});
  expect_bits_equal(out, slice_ref(a, 53, 1, 31, 5, 50, 3, t));
  out.assign(7 * 53, 0);
  f.read_f32("a", out.data(), {30, -1});
  expect_bits_equal(out, slice_ref(a, 53, 1, 30, 7, 0, 53, t));
  // 1-D row slice (a bias shard) and a 3-D column slice (inner dims kept).
  out.assign(2, 0);
  f.read_f32("b.bias", out.data(), {3, 2});
  expect_bits_equal(out, slice_ref(b, 1, 1, 3, 2, 0, 1, t));
  out.assign(4 * 3 * 11, 0);
  f.read_f32("c", out.data(), {8, 4}, {2, 3});
  expect_bits_equal(out, slice_ref(c, 7, 11, 8, 4, 2, 3, t));

  // Out-of-range slices are refused naming the tensor.
  expect_one_line_containing(error_of([&] {
                               f.read_f32("a", out.data(), {30, 8});
                             }),
                             {"tensor a", "row slice", "out of range"});
  expect_one_line_containing(error_of([&] {
                               f.read_f32("a", out.data(), {}, {-1, 2});
                             }),
                             {"tensor a", "column slice"});
  expect_one_line_containing(error_of([&] {
                               f.read_f32("b.bias", out.data(), {}, {0, 1});
                             }),
                             {"tensor b.bias", "column slice"});

  // SafetensorsCheckpoint on the single file and on a directory holding model.safetensors.
  fs::rename(path, dir.file("model.safetensors"));
  SafetensorsCheckpoint ck(dir.path);
  EXPECT_EQ(ck.num_files(), 1u);
  const Tensor ta = ck.load("a", {37, 53}, {2, 3}, {5, 7});
  EXPECT_EQ(ta.shape, (std::vector<int64_t>{3, 7}));
  expect_bits_equal(ta.data, slice_ref(a, 53, 1, 2, 3, 5, 7, t));
  SafetensorsCheckpoint ck_file(dir.file("model.safetensors"));
  EXPECT_TRUE(ck_file.has("c"));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RoundTrip,
                         ::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(Safetensors, BF16ValuesAreRoundedNotTruncated) {
  TempDir dir;
  // 1 + 2^-8 + 2^-9 rounds up to 1 + 2^-7 in bf16 (7 mantissa bits); truncation gives 1.
  const float x[2] = {1.0f + 0x1p-8f + 0x1p-9f, -3.0f};
  write_safetensors(dir.file("r.safetensors"), {{"x", DType::kBF16, {2}, x}});
  SafetensorsFile f(dir.file("r.safetensors"));
  float out[2];
  f.read_f32("x", out);
  EXPECT_EQ(out[0], 1.0f + 0x1p-7f);
  EXPECT_EQ(out[1], -3.0f);
}

TEST(Safetensors, UnalignedDataAndHandBuiltHeader) {
  // Header of odd length, so the data of both tensors is not 4-byte aligned in the file.
  TempDir dir;
  const float v[3] = {1.5f, -2.25f, 1e-3f};
  const uint16_t h[2] = {f32_to_bf16(0.375f), f32_to_bf16(-7.0f)};
  std::string data(reinterpret_cast<const char*>(h), 4);
  data += std::string(reinterpret_cast<const char*>(v), 12);
  const std::string header = R"({"h":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},)"
                             R"("v":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}})";
  ASSERT_NE(header.size() % 4, 0u);
  write_bytes(dir.file("u.safetensors"), raw_file(header, data));
  SafetensorsFile f(dir.file("u.safetensors"));
  float out[3];
  f.read_f32("v", out);
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -2.25f);
  EXPECT_EQ(out[2], 1e-3f);
  f.read_f32("h", out);
  EXPECT_EQ(out[0], 0.375f);
  EXPECT_EQ(out[1], -7.0f);
  EXPECT_TRUE(f.metadata().empty());
}

TEST(Safetensors, CorruptFilesGiveOneClearLine) {
  TempDir dir;
  const std::string good_header = R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})";
  const std::string data(24, '\x01');
  struct Case {
    std::string name, bytes;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"empty", "", {"truncated", "8-byte header length"}},
      {"short_len", std::string(5, '\0'), {"truncated", "8-byte header length"}},
      {"len_too_large", raw_file(good_header, data, 4096), {"truncated", "header length 4096"}},
      {"truncated_header", raw_file(good_header, "").substr(0, 30), {"truncated", "header length"}},
      {"bad_json", raw_file(R"({"w":{"dtype":"F32",)", data), {"corrupt JSON header"}},
      {"not_object", raw_file("[1,2,3]", data), {"corrupt JSON header", "not a JSON object"}},
      {"missing_fields",
       raw_file(R"({"w":{"dtype":"F32","shape":[6]}})", data),
       {"tensor w", "data_offsets"}},
      {"unknown_dtype",
       raw_file(R"({"w":{"dtype":"I64","shape":[3],"data_offsets":[0,24]}})", data),
       {"tensor w", "unsupported dtype I64"}},
      {"negative_dim",
       raw_file(R"({"w":{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]}})", data),
       {"tensor w", "negative"}},
      {"offsets_beyond_data",
       raw_file(R"({"w":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]}})", data),
       {"tensor w", "bad data_offsets [0, 32]", "24 bytes"}},
      {"offsets_reversed",
       raw_file(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", data),
       {"tensor w", "bad data_offsets [8, 4]"}},
      {"offsets_vs_shape",
       raw_file(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,24]}})", data),
       {"tensor w", "span of 24 bytes", "needs 16"}},
      {"data_truncated",
       raw_file(good_header, data.substr(0, 20)),
       {"tensor w", "bad data_offsets [0, 24]", "truncated"}},
      {"bad_metadata", raw_file(R"({"__metadata__":3})", ""), {"__metadata__"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir.file(c.name + ".safetensors");
    write_bytes(path, c.bytes);
    const std::string msg = error_of([&] { SafetensorsFile f(path); });
    auto parts = c.expect;
    parts.push_back(path);
    expect_one_line_containing(msg, parts);
  }
  // Sanity: the good header with its data opens.
  write_bytes(dir.file("good.safetensors"), raw_file(good_header, data));
  EXPECT_NO_THROW(SafetensorsFile f(dir.file("good.safetensors")));

  expect_one_line_containing(error_of([&] { SafetensorsFile f(dir.file("nope.safetensors")); }),
                             {"cannot open", dir.file("nope.safetensors")});
  expect_one_line_containing(error_of([&] { SafetensorsFile f(dir.path); }), {dir.path});
}

TEST(Safetensors, MissingTensorAndShapeMismatch) {
  TempDir dir;
  const auto w = test::random_normal(288 * 768, 7);
  write_safetensors(dir.file("model.safetensors"),
                    {{"model.layers.3.mlp.down_proj.weight", DType::kBF16, {288, 768}, w.data()}});
  SafetensorsCheckpoint ck(dir.path);
  expect_one_line_containing(error_of([&] {
                               ck.load("model.layers.3.mlp.up_proj.weight", {768, 288});
                             }),
                             {"tensor model.layers.3.mlp.up_proj.weight not found in " + dir.path});
  expect_one_line_containing(error_of([&] {
                               ck.load("model.layers.3.mlp.down_proj.weight", {768, 288});
                             }),
                             {"model.layers.3.mlp.down_proj.weight", dir.file("model.safetensors"),
                              "expected [768, 288], file has [288, 768]"});
  SafetensorsFile f(dir.file("model.safetensors"));
  expect_one_line_containing(error_of([&] { f.info("x"); }),
                             {"tensor x not found in " + dir.file("model.safetensors")});

  TempDir empty;
  expect_one_line_containing(error_of([&] { SafetensorsCheckpoint c(empty.path); }),
                             {"no model.safetensors", empty.path});
  expect_one_line_containing(error_of([&] { SafetensorsCheckpoint c(empty.file("missing")); }),
                             {"does not exist", empty.file("missing")});
}

TEST(Safetensors, ShardedIndex) {
  TempDir dir;
  const auto a = test::random_normal(19 * 6, 11), b = test::random_normal(23, 12),
             c = test::random_normal(4 * 9, 13);
  write_safetensors(dir.file("model-00001-of-00002.safetensors"),
                    {{"a", DType::kF32, {19, 6}, a.data()}, {"b", DType::kBF16, {23}, b.data()}});
  write_safetensors(dir.file("model-00002-of-00002.safetensors"),
                    {{"c", DType::kF32, {4, 9}, c.data()}});
  const nlohmann::json index = {{"metadata", {{"total_size", 0}}},
                                {"weight_map",
                                 {{"a", "model-00001-of-00002.safetensors"},
                                  {"b", "model-00001-of-00002.safetensors"},
                                  {"c", "model-00002-of-00002.safetensors"}}}};
  write_bytes(dir.file("model.safetensors.index.json"), index.dump());
  // A stray single file must be ignored when the index exists.
  write_safetensors(dir.file("model.safetensors"), {{"zzz", DType::kF32, {1}, a.data()}});

  SafetensorsCheckpoint ck(dir.path);
  EXPECT_EQ(ck.num_files(), 2u);
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_FALSE(ck.has("zzz"));
  expect_bits_equal(ck.load("a", {19, 6}).data, a);
  expect_bits_equal(ck.load("b", {23}).data, slice_ref(b, 1, 1, 0, 23, 0, 1, DType::kBF16));
  expect_bits_equal(ck.load("c", {4, 9}, {1, 2}, {3, 5}).data,
                    slice_ref(c, 9, 1, 1, 2, 3, 5, DType::kF32));
  expect_one_line_containing(error_of([&] { ck.info("d"); }),
                             {"tensor d not found in " + dir.path});

  // Index naming a missing shard, or a tensor its shard lacks.
  nlohmann::json bad = index;
  bad["weight_map"]["d"] = "model-00003-of-00002.safetensors";
  write_bytes(dir.file("model.safetensors.index.json"), bad.dump());
  expect_one_line_containing(error_of([&] { SafetensorsCheckpoint c(dir.path); }),
                             {"model-00003-of-00002.safetensors", "does not exist"});
  bad = index;
  bad["weight_map"]["d"] = "model-00002-of-00002.safetensors";
  write_bytes(dir.file("model.safetensors.index.json"), bad.dump());
  expect_one_line_containing(error_of([&] { SafetensorsCheckpoint c(dir.path); }),
                             {"tensor d", "model-00002-of-00002.safetensors", "no such tensor"});
  write_bytes(dir.file("model.safetensors.index.json"), "{\"weight_map\": [");
  expect_one_line_containing(error_of([&] { SafetensorsCheckpoint c(dir.path); }),
                             {"corrupt JSON", "model.safetensors.index.json"});
  write_bytes(dir.file("model.safetensors.index.json"), "{\"metadata\": {}}");
  expect_one_line_containing(error_of([&] { SafetensorsCheckpoint c(dir.path); }),
                             {"weight_map", "model.safetensors.index.json"});
}

TEST(Safetensors, WriterRejectsBadEntriesAndLeavesNoFile) {
  TempDir dir;
  const float x[4] = {1, 2, 3, 4};
  const std::string p = dir.file("w.safetensors");
  expect_one_line_containing(
      error_of([&] {
        write_safetensors(p, {{"x", DType::kF32, {4}, x}, {"x", DType::kF32, {2}, x}});
      }),
      {"duplicate tensor name x", p});
  expect_one_line_containing(error_of([&] {
                               write_safetensors(p, {{"y", DType::kF32, {4}, nullptr}});
                             }),
                             {"tensor y", "no data"});
  EXPECT_FALSE(test::file_exists(p));
  EXPECT_FALSE(test::file_exists(p + ".tmp"));
  expect_one_line_containing(
      error_of([&] { write_safetensors(dir.file("no/such/dir/w.safetensors"), {}); }),
      {"cannot create", "no/such/dir/w.safetensors.tmp"});
  // Overwrite is atomic: the old file is replaced as a whole.
  write_safetensors(p, {{"x", DType::kF32, {4}, x}});
  write_safetensors(p, {{"z", DType::kF32, {2}, x}});
  SafetensorsFile f(p);
  EXPECT_EQ(f.names(), std::vector<std::string>{"z"});
}

TEST(Safetensors, MoveKeepsMapping) {
  TempDir dir;
  const auto x = test::random_normal(33, 5);
  write_safetensors(dir.file("m.safetensors"), {{"x", DType::kF32, {33}, x.data()}});
  SafetensorsFile a(dir.file("m.safetensors"));
  SafetensorsFile b(std::move(a));
  EXPECT_FALSE(a.is_open());
  std::vector<float> out(33);
  b.read_f32("x", out.data());
  expect_bits_equal(out, x);
  SafetensorsFile c;
  c = std::move(b);
  c.read_f32("x", out.data());
  expect_bits_equal(out, x);
}

}  // namespace
}  // namespace mprefill
