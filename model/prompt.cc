#include "model/prompt.h"

#include <stdexcept>

namespace mprefill {

void check_prompt_ids(const ModelConfig& c, const std::vector<int>& ids, const std::string& what) {
  if (ids.empty()) throw std::runtime_error(what + " is empty (at least one token is needed)");
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n > kMaxPromptTokens)
    throw std::runtime_error(what + " of " + std::to_string(n) + " tokens is over 2^31 - 1");
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= c.vocab)
      throw std::runtime_error((what == "prompt" ? std::string() : what + " ") + "token id " +
                               std::to_string(ids[i]) + " at position " + std::to_string(i) +
                               " is out of range [0, " + std::to_string(c.vocab) + ")");
}

void check_prompt(const ModelConfig& c, const std::vector<int>& ids, int64_t max_prompt) {
  check_prompt_ids(c, ids);
  const int64_t n = static_cast<int64_t>(ids.size());
  if (max_prompt < 0)
    throw std::runtime_error("max prompt must be >= 0, got " + std::to_string(max_prompt));
  if (max_prompt == 0 && n > c.max_position)
    throw std::runtime_error("prompt has " + std::to_string(n) +
                             " tokens, over the model's limit of " +
                             std::to_string(c.max_position) +
                             " (max_position_embeddings; raise the limit with --max-prompt)");
  if (max_prompt > 0 && n > max_prompt)
    throw std::runtime_error("prompt has " + std::to_string(n) + " tokens, over the limit of " +
                             std::to_string(max_prompt) + " set by --max-prompt");
}

void check_token_id(const ModelConfig& c, int64_t id, const std::string& what) {
  if (id < 0 || id >= c.vocab)
    throw std::runtime_error(what + " " + std::to_string(id) + " is out of range [0, " +
                             std::to_string(c.vocab) + ")");
}

}  // namespace mprefill
