#include "tests/testutil.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <stdexcept>

namespace mprefill::test {

std::string shared_dir() {
  if (const char* e = std::getenv("MPREFILL_SHARED_DIR")) return e;
  return MPREFILL_SHARED_DIR;
}
std::string source_dir() { return MPREFILL_SOURCE_DIR; }
// MPREFILL_BIN_DIR: the instrumented service binaries of CI's sanitizer stage (bin-asan/).
std::string bin_dir() {
  if (const char* e = std::getenv("MPREFILL_BIN_DIR")) return e;
  return MPREFILL_BIN_DIR;
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string missing_file(const std::string& path, const std::string& what) {
  std::error_code ec;
  std::string abs = std::filesystem::absolute(path, ec).lexically_normal().string();
  if (ec) abs = path;
  return (what.empty() ? abs : what) + " not found\nSKIP-MISSING-FILE: " + abs;
}

std::vector<float> random_uniform(size_t n, uint64_t seed, float a) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> d(-a, a);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

std::vector<float> random_normal(size_t n, uint64_t seed, float sd) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m;
}

double max_abs_diff(const float* a, const double* ref, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - ref[i]);
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

double max_abs_diff(const float* a, const float* b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

bool normwise_close(const float* out, const double* ref, size_t n, double tol, std::string* why) {
  double mref = 0;
  for (size_t i = 0; i < n; ++i) mref = std::max(mref, std::fabs(ref[i]));
  const double err = max_abs_diff(out, ref, n);
  const bool ok = err <= tol * mref;
  if (!ok && why) {
    std::ostringstream s;
    s << "max|out-ref| = " << err << " > " << tol << " * max|ref| (" << mref << ")";
    *why = s.str();
  }
  return ok;
}

std::string tiny_generate_command(const std::string& bin) {
  std::string ids;
  for (int i = 0; i < 300; ++i) ids += (i ? "," : "") + std::to_string(1 + (i * 37) % 500);
  return bin + " generate --model random:tiny:2 --prompt-ids " + ids + " ";
}

int run_command(const std::string& cmd, std::string* output) {
  std::string full = cmd + " 2>&1";
  FILE* f = ::popen(full.c_str(), "r");
  if (!f) return -1;
  std::array<char, 4096> buf;
  std::string out;
  size_t k;
  while ((k = std::fread(buf.data(), 1, buf.size(), f)) > 0) out.append(buf.data(), k);
  const int st = ::pclose(f);
  if (output) *output = out;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

std::string make_self_signed_cert(const std::string& dir, const std::string& name,
                                  const std::string& cn) {
  auto q = [](const std::string& x) { return "'" + x + "'"; };  // test paths hold no quote
  std::string out;
  const int rc =
      run_command("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout " +
                      q(dir + "/" + name + ".key") + " -out " + q(dir + "/" + name + ".pem") +
                      " -days 1 -subj /CN=" + cn + " -addext subjectAltName=IP:127.0.0.1",
                  &out);
  return rc == 0 ? "" : out;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no exception thrown";
  return "";
}

void expect_one_line_containing(const std::string& msg, const std::vector<std::string>& parts) {
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  for (const std::string& p : parts)
    EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

TempDir::TempDir(const std::string& prefix) {
  std::string t = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
  if (!::mkdtemp(t.data())) throw std::runtime_error("mkdtemp failed for " + t);
  path = t;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

std::string TempDir::file(const std::string& name) const {
  return (std::filesystem::path(path) / name).string();
}

std::string TempDir::sub(const std::string& name) const {
  const std::string p = file(name);
  std::filesystem::create_directories(p);
  return p;
}

}  // namespace mprefill::test
