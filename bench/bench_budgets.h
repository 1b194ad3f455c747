// Per-head budgets of an MInference config file for mprefill-bench (host only, C++17
// types: the .cu that uses it is compiled as C++17 and must not see the JSON library or
// model/sparse_policy.h).
#pragma once
#include <string>
#include <vector>

namespace mprefill::bench {

// kind: "dense", "a_shape", "vertical_slash", "block_sparse" (PatternKind names);
// a, b as in HeadPattern (vertical-slash: v, s).
struct BudgetHead {
  std::string kind;
  int a = 0, b = 0;
};
struct BudgetClass {
  BudgetHead pattern;
  int count = 0;
};
struct BudgetFile {
  std::string path;
  int n_layers = 0, n_heads = 0;
  std::vector<BudgetHead> heads;     // [n_layers][n_heads]
  std::vector<BudgetClass> classes;  // by count, descending
};

// Reads the file through load_sparse_policy with the layer/head counts the file itself
// has. Throws std::runtime_error naming the file.
BudgetFile read_budget_file(const std::string& path);

}  // namespace mprefill::bench
