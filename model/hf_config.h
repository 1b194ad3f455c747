// The model config of an HF directory (config.json), as every reader of such a directory
// takes it: parsed by parse_hf_config, RoPE rotate-half (the HF convention).
#pragma once
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

#include "model/model_config.h"

namespace mprefill {

// Throws std::runtime_error naming DIR/config.json when it is missing or does not parse.
inline ModelConfig read_hf_dir_config(const std::string& dir) {
  const std::filesystem::path cfg_path = std::filesystem::path(dir) / "config.json";
  std::ifstream f(cfg_path);
  if (!f)
    throw std::runtime_error("cannot open " + cfg_path.string() + " (not an HF model directory?)");
  std::ostringstream ss;
  ss << f.rdbuf();
  ModelConfig cfg;
  try {
    cfg = parse_hf_config(ss.str());
  } catch (const std::exception& e) {
    throw std::runtime_error(cfg_path.string() + ": " + e.what());
  }
  cfg.rope_style = RopeStyle::kRotateHalf;
  return cfg;
}

}  // namespace mprefill
