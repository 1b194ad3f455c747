// Argument helpers shared by the command-line binaries: a usage error type (exit status
// 2 at the edge) and strict parsers that name the flag in their one-line messages.
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
std::string hostname();

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

// Options of one job (the prompt and what to do with it), the same for
// `mprefill generate`, `submit` and `run`.
struct JobOptions {
  std::optional<std::string> prompt, prompt_ids, prompt_file;  // exactly one is given
  int decode = 0;
  int audit_heads = 0;  // heads per layer audited against dense attention
  std::string sparse = "dense";
  int64_t dense_below = 0;
  double temperature = 0.0, top_p = 1.0;
  uint64_t seed = 0;
  std::vector<int> stop_ids;

  // Takes the current flag of r (and its value) when it is one of the options above
  // (--prompt, --prompt-ids, --prompt-file, --decode, --audit-heads, --sparse,
  // --dense-below, --temperature, --top-p, --seed, --stop-ids); false otherwise.
  bool take(FlagReader& r);
  // UsageError unless exactly one of --prompt, --prompt-ids, --prompt-file was given.
  void require_one_prompt() const;
};

// The prompt of a job: token ids (--prompt-ids) or text (--prompt, --prompt-file read
// less one trailing newline). Throws std::runtime_error "prompt is empty (...)" for an
// empty one.
struct PromptInput {
  std::vector<int> ids;  // --prompt-ids
  std::string text;      // --prompt / --prompt-file
};
PromptInput read_prompt(const JobOptions& o);

}  // namespace mprefill::cli
