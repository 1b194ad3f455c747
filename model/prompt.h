// The one check of a prompt's token ids against a model, used by every executor, the
// worker service, the coordinator and the tools (messages are part of the CLI and wire
// contract: tests match them).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/model_config.h"

namespace mprefill {

// Longest prompt any executor takes (positions and kernel indices are 32-bit).
constexpr int64_t kMaxPromptTokens = (int64_t{1} << 31) - 1;

// Throws std::runtime_error for an empty prompt, an id out of [0, vocab) ("token id 97 at
// position 4 is out of range [0, 97)"), or more than kMaxPromptTokens ids. `what` names
// the ids in messages ("prompt", "calibration prompt").
void check_prompt_ids(const ModelConfig& cfg, const std::vector<int>& ids,
                      const std::string& what = "prompt");

// check_prompt_ids, then the length limit: max_prompt > 0 is the limit (set by
// --max-prompt), 0 means the model's max_position. Throws for max_prompt < 0.
void check_prompt(const ModelConfig& cfg, const std::vector<int>& ids, int64_t max_prompt);

// One id (e.g. a first token handed to a decoder): throws "<what> <id> is out of range
// [0, vocab)".
void check_token_id(const ModelConfig& cfg, int64_t id, const std::string& what);

}  // namespace mprefill
