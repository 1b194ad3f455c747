// Argument helpers shared by the command-line binaries: a usage error type (exit status
// 2 at the edge) and strict parsers that name the flag in their one-line messages.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mprefill::cli {

// Bad command line: the binary prints "NAME: error: WHAT" plus its usage and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Newlines to spaces, so that an error stays one line.
std::string one_line(std::string s);

// The whole of s as an integer in [lo, hi]; UsageError naming flag otherwise.
int64_t parse_int(const std::string& flag, const std::string& s, int64_t lo, int64_t hi);
// The whole of s as a number; UsageError naming flag otherwise.
double parse_float(const std::string& flag, const std::string& s);
// "1,2,3" (spaces around items allowed) -> ids; "" -> {}.
std::vector<int> parse_id_list(const std::string& flag, const std::string& s);
// The file's bytes less one trailing newline (editors add one); throws when unreadable.
std::string read_text_file(const std::string& path);
std::string hostname();

}  // namespace mprefill::cli
