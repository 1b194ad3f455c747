// libFuzzer target: the sparse config JSON a client may send inline with a job (issue 17:
// the coordinator parses it, model/sparse_policy.h parse_minference_config). Any input is
// either a policy of the model's shape or one std::exception; never a crash, a hang or an
// allocation the text does not pay for. Two shapes: Llama-3-8B (the committed MInference
// configs of configs/minference are the seeds) and the 4-layer, 4-head "tiny" shape (small configs).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>

#include "model/model_config.h"
#include "model/sparse_policy.h"

namespace {

void check_shape(const mprefill::SparsePolicy& p, const mprefill::ModelConfig& c) {
  // The parser promises one pattern per (layer, head) of the model (none: all dense).
  if (!p.heads.empty() && p.heads.size() != static_cast<size_t>(c.n_layers) * c.n_heads)
    std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const mprefill::ModelConfig big = mprefill::named_shape("llama3-8b");
  static const mprefill::ModelConfig small = mprefill::named_shape("tiny");
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (const mprefill::ModelConfig* c : {&big, &small}) {
    try {
      check_shape(mprefill::parse_minference_config(text, "fuzz", *c), *c);
    } catch (const std::exception&) {
    }
  }
  return 0;
}
