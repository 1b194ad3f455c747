// What `mprefill generate` reports about a prefill: the sparse policy and the heads that
// actually ran (text and JSON), and the online audit (engine/audit.h) per head and per job.
#pragma once
#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "engine/engine.h"
#include "model/sparse_policy.h"

namespace mprefill::cli {

// The policy's patterns and the heads run per kind.
nlohmann::json sparse_json(const SparsePolicy& p, const PrefillStats& st);
// What ran, not what the policy asked: "dense on every head (5 tokens < --dense-below
// 32768)" or "vertical_slash x30, dense x6 (policy: auto)".
std::string ran_summary(const SparsePolicy& p, const PrefillStats& st);
// Heads per pattern kind (dense, A-shape, vertical-slash, block-sparse) as one line:
// "vertical_slash x30, dense x6" (sparse kinds first; "" when all are zero).
std::string heads_summary(const std::array<int64_t, 4>& per_kind);
// One entry per audited head (engine/audit.h).
nlohmann::json audit_json(const PrefillStats& st);
// The job's audit in one object: heads, mean and lowest recall, overall and over the
// adaptive heads (the adaptive policy's recall; issue 18).
nlohmann::json audit_summary_json(const PrefillStats& st);

}  // namespace mprefill::cli
