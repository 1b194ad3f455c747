// What the service binaries share beyond the flag parsing of cli/flags.h: the host name
// and the options of one job (mprefill generate / submit / run).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cli/flags.h"

namespace mprefill::cli {

std::string hostname();

// Options of one job (the prompt and what to do with it), the same for
// `mprefill generate`, `submit` and `run`.
struct JobOptions {
  std::optional<std::string> prompt, prompt_ids, prompt_file;  // exactly one is given
  int decode = 16;  // tokens decoded after the first one
  int audit_heads = 0;  // heads per layer audited against dense attention
  std::string sparse = "dense";
  std::optional<int64_t> dense_below;  // --dense-below; unset: the default (32768)
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
