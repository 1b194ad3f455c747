#include "tools/cli_args.h"

#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <sstream>

namespace mprefill::cli {

bool JobOptions::take(FlagReader& r) {
  const std::string& flag = r.flag();
  if (flag == "--prompt") {
    prompt = r.value();
  } else if (flag == "--prompt-ids") {
    prompt_ids = r.value();
  } else if (flag == "--prompt-file") {
    prompt_file = r.value();
  } else if (flag == "--decode") {
    decode = static_cast<int>(parse_int(flag, r.value(), 0, 1 << 24));
  } else if (flag == "--audit-heads") {
    audit_heads = static_cast<int>(parse_int(flag, r.value(), 0, 1 << 20));
  } else if (flag == "--sparse") {
    sparse = r.value();
  } else if (flag == "--dense-below") {
    dense_below = parse_int(flag, r.value(), 0, int64_t{1} << 40);
  } else if (flag == "--temperature") {
    temperature = parse_float(flag, r.value());
  } else if (flag == "--top-p") {
    top_p = parse_float(flag, r.value());
  } else if (flag == "--seed") {
    seed = static_cast<uint64_t>(parse_int(flag, r.value(), 0, INT64_MAX));
  } else if (flag == "--stop-ids") {
    stop_ids = parse_id_list(flag, r.value());
  } else {
    return false;
  }
  return true;
}

void JobOptions::require_one_prompt() const {
  if (!!prompt + !!prompt_ids + !!prompt_file != 1)
    throw UsageError("give exactly one of --prompt, --prompt-ids, --prompt-file");
}

PromptInput read_prompt(const JobOptions& o) {
  PromptInput p;
  if (o.prompt_ids) {
    p.ids = parse_id_list("--prompt-ids", *o.prompt_ids);
    if (p.ids.empty()) throw std::runtime_error("prompt is empty (--prompt-ids has no ids)");
    return p;
  }
  p.text = o.prompt ? *o.prompt : read_text_file(*o.prompt_file);
  if (p.text.empty())
    throw std::runtime_error(o.prompt ? "prompt is empty (--prompt \"\")"
                                      : "prompt is empty (file " + *o.prompt_file + ")");
  return p;
}

std::string hostname() {
  char buf[256] = {};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

}  // namespace mprefill::cli
