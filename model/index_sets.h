// Synthetic sparse index sets (../shared/BENCHMARKS.md "Index sets") and the index file
// format shared by every implementation (--dump-indices / --load-indices):
//   little-endian int32: magic 0x5849504D ("MPIX"), version 1, kind (1 vertical-slash,
//   2 block-sparse), seq_len N, query heads H, block 64; then head after head:
//   kind 1: nnz_v, nnz_s, nnz_v columns ascending, nnz_s offsets descending;
//   kind 2: k, then for each of ceil(N/64) query blocks k key blocks ascending, -1 padded.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels/sparse.h"

namespace mprefill {

enum class IndexSetKind { kUniform, kClustered };
IndexSetKind parse_index_set_kind(const std::string& name);  // "uniform" | "clustered"

// One head's vertical-slash selection with budgets (v, s) clamped as MInference does.
// uniform: columns 0..29 + uniform distinct columns; offsets 0..99 + uniform distinct
// offsets in [100, N). clustered: columns as uniform; offsets 0..99, then until s are
// distinct: p = 0.8 -> 100 + floor(Exp(mean 2048)), else floor(exp(U(ln 100, ln N))),
// dropping offsets >= N.
VsSelection synthetic_vs(IndexSetKind kind, int64_t n, int v, int s, uint64_t seed);

// Files. Loaders throw std::runtime_error naming the file and the first bad field.
void save_vs_indices(const std::string& path, int64_t n, const std::vector<VsSelection>& heads);
std::vector<VsSelection> load_vs_indices(const std::string& path, int64_t* n_out);
void save_block_sparse_indices(const std::string& path, const BlockSparseIndex& ix);
BlockSparseIndex load_block_sparse_indices(const std::string& path);

}  // namespace mprefill
