#include "model/weight_source.h"

#include <algorithm>
#include <filesystem>
#include <stdexcept>

#include "model/hf_config.h"

namespace mprefill {
namespace {

void check_full(const std::string& name, const Tensor* t, int64_t n) {
  if (!t || static_cast<int64_t>(t->data.size()) != n)
    throw std::runtime_error("weight " + name + " has " + std::to_string(t ? t->data.size() : 0) +
                             " values, expected " + std::to_string(n));
}

}  // namespace

WeightSource::WeightSource(const std::string& path) {
  std::error_code ec;
  if (path.rfind("random:", 0) != 0 && std::filesystem::is_directory(path, ec)) {
    cfg_ = read_hf_dir_config(path);
    ck_ = std::make_unique<SafetensorsCheckpoint>(path);
  } else {
    owned_ = std::make_unique<ModelWeights>(load_model(path));
    full_ = owned_.get();
    cfg_ = full_->config;
  }
  cfg_.validate();
}

WeightSource::WeightSource(const ModelWeights& borrowed) : cfg_(borrowed.config), full_(&borrowed) {
  cfg_.validate();
}

WeightSource::~WeightSource() = default;

void WeightSource::rows(const std::string& hf_name, const Tensor* t, int64_t R, int64_t C,
                        int64_t r0, int64_t nr, std::vector<float>* dst) const {
  if (ck_) {
    const Tensor s = ck_->load(hf_name, {R, C}, RowSlice{r0, nr});
    dst->insert(dst->end(), s.data.begin(), s.data.end());
  } else {
    check_full(hf_name, t, R * C);
    dst->insert(dst->end(), t->data.begin() + r0 * C, t->data.begin() + (r0 + nr) * C);
  }
}

std::vector<float> WeightSource::cols(const std::string& hf_name, const Tensor* t, int64_t R,
                                      int64_t C, int64_t c0, int64_t nc) const {
  if (ck_) return ck_->load(hf_name, {R, C}, RowSlice{}, ColSlice{c0, nc}).data;
  check_full(hf_name, t, R * C);
  std::vector<float> out(static_cast<size_t>(R * nc));
  for (int64_t r = 0; r < R; ++r)
    std::copy_n(t->data.begin() + r * C + c0, nc, out.begin() + r * nc);
  return out;
}

std::vector<float> WeightSource::whole(const std::string& hf_name, const Tensor* t,
                                       const std::vector<int64_t>& shape) const {
  if (ck_) return ck_->load(hf_name, shape).data;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  check_full(hf_name, t, n);
  return t->data;
}

bool WeightSource::has(const std::string& hf_name, const Tensor* t) const {
  return ck_ ? ck_->has(hf_name) : (t && !t->empty());
}

int64_t WeightSource::full_bytes() const {
  if (!full_) return 0;
  int64_t n = full_->embed.numel() + full_->lm_head.numel();
  for (const auto& L : full_->layers)
    n += L.wq.numel() + L.wk.numel() + L.wv.numel() + L.wo.numel() + L.w_gate.numel() +
         L.w_up.numel() + L.w_down.numel();
  return n * static_cast<int64_t>(sizeof(float));
}

bool WeightSource::has_lm_head() const {
  return ck_ ? ck_->has("lm_head.weight") : !full_->lm_head.empty();
}

}  // namespace mprefill
