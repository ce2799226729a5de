// NSF (normalized sigmoid) and anchor_kl, forward and backward. Plain C++ interface: no torch and no
// CUDA headers, so the pybind11 binding compiles with the host compiler alone.
//
// All tensors are contiguous device arrays. Rows x: (R, N) row-major in `dtype` (computed in
// float32); valid: (R, N) bytes, nonzero = a real entry, or nullptr (every entry is real). Each row
// is split into `chunks` chunks, one warp each; per-chunk float32 partials are combined in a fixed
// order, so every result is deterministic. Each launcher returns nullptr on success, else a static
// message naming the invalid argument or the CUDA error.
#pragma once

#include <cstdint>

#include "gated_attention.h"  // DType

namespace milkernels {

struct RowsArgs {
  int64_t rows, n;
  int64_t chunks;  // warps per row, 1 <= chunks <= n
  float inv_temperature;
  DType dtype;
};

// p = sigmoid(s / T) / (S + 1e-8) on valid entries, 0 elsewhere, with S = the row's valid sum of
// sigmoid(s / T), written to row_sum: (R,). workspace: R * chunks floats.
const char* launch_nsf_forward(const void* scores, const uint8_t* valid, void* out, float* workspace,
                               float* row_sum, const RowsArgs& args, void* stream);

// ds = sigmoid'(s / T) / T / (S + 1e-8) * (g - sum_n g_n p_n) on valid entries, 0 elsewhere, from the
// forward's row_sum and the output gradient g; row_dot: (R,) receives sum_n g_n p_n.
// workspace: R * chunks floats.
const char* launch_nsf_backward(const void* scores, const uint8_t* valid, const float* row_sum,
                                const void* grad_out, void* grad_scores, float* workspace,
                                float* row_dot, const RowsArgs& args, void* stream);

// total: (1,) = sum over valid entries of NSF(anchor / T) * log_softmax(online), the log-softmax over
// each row's valid entries. Per row, for the backward: lse (log-sum-exp of online, 0 for a row with
// no valid entry), row_anchor (S of the anchor) and row_loss (the row's share of total), each (R,).
// workspace: 4 * R * chunks floats.
const char* launch_anchor_kl_forward(const void* online, const void* anchor, const uint8_t* valid,
                                     float* workspace, float* lse, float* row_anchor, float* row_loss,
                                     float* total, const RowsArgs& args, void* stream);

// Gradients of L = -total / M, with coef: (1,) = dL_out / M, from the forward's row statistics:
// grad_online = coef * (softmax(online) * S / (S + eps) - p_anchor) and
// grad_anchor = coef * sigmoid'(anchor / T) / T / (S + eps) * (row_loss - log_softmax(online)),
// 0 on masked entries. Either output may be nullptr (not computed).
const char* launch_anchor_kl_backward(const void* online, const void* anchor, const uint8_t* valid,
                                      const float* lse, const float* row_anchor, const float* row_loss,
                                      const float* coef, void* grad_online, void* grad_anchor,
                                      const RowsArgs& args, void* stream);

}  // namespace milkernels
