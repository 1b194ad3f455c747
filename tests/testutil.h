// Shared helpers for the test suites: random data, normwise comparison, paths.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace mprefill::test {

// Path of ../shared (set at configure time; MPREFILL_SHARED_DIR in the environment wins).
std::string shared_dir();
std::string source_dir();
std::string bin_dir();
bool file_exists(const std::string& path);

// Skip message of a test whose input file (a model, a tokenizer, a built binary) is not
// there: "<what> not found" and, on a line of its own, "SKIP-MISSING-FILE: <absolute
// path>". launch/check_skips.sh fails CI when a skipped test names a path that exists.
std::string missing_file(const std::string& path, const std::string& what = "");

// Skips the current test (GTEST_SKIP, so from a void function) unless `path` exists.
#define MPREFILL_SKIP_IF_MISSING(path)                                \
  do {                                                                \
    const std::string mprefill_path_ = (path);                        \
    if (!::mprefill::test::file_exists(mprefill_path_))               \
      GTEST_SKIP() << ::mprefill::test::missing_file(mprefill_path_); \
  } while (0)

// Uniform(-a, a) or normal(0, sd) values from a seeded generator (never zeros).
std::vector<float> random_uniform(size_t n, uint64_t seed, float a = 1.f);
std::vector<float> random_normal(size_t n, uint64_t seed, float sd = 1.f);

// max|x| and max|x - y|.
double max_abs(const std::vector<double>& x);
double max_abs_diff(const float* a, const double* ref, size_t n);
double max_abs_diff(const float* a, const float* b, size_t n);

// Normwise check: max|out - ref| <= tol * max|ref| (and no NaN in out).
bool normwise_close(const float* out, const double* ref, size_t n, double tol, std::string* why);

// Run a command through the shell; returns exit status, captures stdout+stderr.
int run_command(const std::string& cmd, std::string* output);

// A self-signed certificate for 127.0.0.1 (EC P-256, one day, CN cn) made now with the
// openssl CLI (nothing downloaded): DIR/NAME.pem and DIR/NAME.key. "" when it worked, else
// openssl's output.
std::string make_self_signed_cert(const std::string& dir, const std::string& name,
                                  const std::string& cn = "mprefill-test");

// `BIN generate --model random:tiny:2 --prompt-ids <300 fixed ids> ` (the CLI tests' prompt;
// the caller appends its options).
std::string tiny_generate_command(const std::string& bin);

// Runs fn and expects a std::runtime_error; returns its message ("" and a test failure
// when nothing is thrown).
std::string error_of(const std::function<void()>& fn);

// msg is one line and holds every one of parts.
void expect_one_line_containing(const std::string& msg, const std::vector<std::string>& parts);

// A fresh directory under the system temp dir (mkdtemp, "PREFIX_XXXXXX"), removed with
// its contents on destruction. Throws std::runtime_error when it cannot be made.
struct TempDir {
  std::string path;

  explicit TempDir(const std::string& prefix = "mprefill_test");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // path/name (nothing is created).
  std::string file(const std::string& name) const;
  // path/name, created (with its parents) if missing.
  std::string sub(const std::string& name) const;
};

}  // namespace mprefill::test
