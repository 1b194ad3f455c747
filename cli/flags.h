// Flag parsing shared by the command-line binaries (tools/) and mprefill-search's modes
// (search/): a usage error type (exit status 2 at the edge), strict parsers that name the
// flag in their one-line messages, and FlagReader, which walks a command line.
#pragma once
#include <cstdint>
#include <optional>
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

// A command line walked one argument at a time; "--flag value" and "--flag=value" alike.
class FlagReader {
 public:
  FlagReader(int argc, char** argv) : argc_(argc), argv_(argv) {}
  // Moves to the next argument; false after the last.
  bool next();
  // "--flag" of "--flag=value", else the argument as given.
  const std::string& flag() const { return flag_; }
  // The argument as given ("--flag=value" whole).
  std::string arg() const { return argv_[i_]; }
  // The flag's value: the part after '=', else the next argument (consumed);
  // UsageError "FLAG needs a value" when there is none.
  std::string value();

 private:
  int argc_;
  char** argv_;
  int i_ = -1;
  std::string flag_;
  std::optional<std::string> inline_value_;
};

}  // namespace mprefill::cli
