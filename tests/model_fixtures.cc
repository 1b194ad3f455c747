#include "tests/model_fixtures.h"

#include <stdexcept>

namespace mprefill::test {

SparsePolicy cycled_policy(const ModelConfig& cfg, const std::vector<HeadPattern>& kinds,
                           int64_t dense_below) {
  if (kinds.empty()) throw std::invalid_argument("cycled_policy: no kinds");
  SparsePolicy p;
  p.source = "test-mix";
  p.n_layers = cfg.n_layers;
  p.n_heads = cfg.n_heads;
  p.dense_below = dense_below;
  for (int l = 0; l < cfg.n_layers; ++l)
    for (int h = 0; h < cfg.n_heads; ++h) p.heads.push_back(kinds[(l + h) % kinds.size()]);
  return p;
}

SparsePolicy mixed_policy(const ModelConfig& cfg, HeadPattern ashape, HeadPattern vs,
                          HeadPattern bs, int64_t dense_below) {
  return cycled_policy(cfg, {HeadPattern::dense(), ashape, vs, bs}, dense_below);
}

ModelConfig small_gqa_config() {
  ModelConfig c;
  c.hidden = 256;
  c.intermediate = 352;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 128;
  c.vocab = 384;
  c.max_position = 1 << 20;
  c.rope_theta = 10000.0;
  c.validate();
  return c;
}

SparsePolicy gqa_split_policy(const ModelConfig& cfg) {
  if (cfg.n_layers != 2 || cfg.n_heads != 4)
    throw std::invalid_argument("gqa_split_policy: a 2-layer, 4-head model only");
  SparsePolicy p;
  p.source = "test-mix";
  p.n_layers = cfg.n_layers;
  p.n_heads = cfg.n_heads;
  p.dense_below = 0;
  p.heads = {HeadPattern::dense(),
             HeadPattern::a_shape(64, 128),
             HeadPattern::vertical_slash(40, 60),
             HeadPattern::block_sparse(3),
             HeadPattern::vertical_slash(100, 200),
             HeadPattern::vertical_slash(30, 50),
             HeadPattern::block_sparse(2),
             HeadPattern::a_shape(16, 64)};
  return p;
}

}  // namespace mprefill::test
