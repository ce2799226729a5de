// NSF (normalized sigmoid) and anchor_kl on rows (R, N): see nsf.h for the math.
//
// Work unit: one warp owns one (row, chunk), a contiguous run of ceil(N / chunks) entries of a row,
// read lane-strided (coalesced). Row reductions run in two fixed-order steps: a warp reduces its chunk
// with __shfl_xor_sync and writes one float32 partial per (row, chunk); a combine kernel (one warp per
// row) reduces a row's partials the same way. The partial layout is (R, chunks), row-major.
// Accumulation is float32; offsets are int64.

#include "nsf.h"
#include "common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace milkernels {
namespace {

constexpr int kWarps = 8;  // warps (work units) per block
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kEps = 1e-8f;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// exp(x - top), and 0 where top is -inf (nothing valid seen).
__device__ __forceinline__ float exp_below(float x, float top) { return top == -INFINITY ? 0.f : expf(x - top); }

// Merges the running (max, sum of exp relative to max) pair (m, l) with (other_m, other_l).
__device__ __forceinline__ void merge_exp(float& m, float& l, float other_m, float other_l) {
  const float top = fmaxf(m, other_m);
  l = l * exp_below(m, top) + other_l * exp_below(other_m, top);
  m = top;
}

__device__ __forceinline__ void warp_merge_exp(float& m, float& l) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_m = __shfl_xor_sync(kFullMask, m, offset);
    const float other_l = __shfl_xor_sync(kFullMask, l, offset);
    merge_exp(m, l, other_m, other_l);
  }
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ bool is_valid(const uint8_t* valid, int64_t i) { return valid == nullptr || valid[i] != 0; }

struct Shape {
  int64_t rows, n, chunks, chunk_len;
  float inv_t;
};

// One warp's (row, chunk): entries row * n + [begin, end), this thread's lane, and the partial slot.
struct Unit {
  int64_t slot, row, base, begin, end;
  int lane;
};

// The calling warp's unit; false (for the whole warp) past the last one.
__device__ __forceinline__ bool warp_unit(const Shape& s, Unit& u) {
  u.slot = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (u.slot >= s.rows * s.chunks) return false;
  u.row = u.slot / s.chunks;
  u.base = u.row * s.n;
  u.begin = u.base + (u.slot % s.chunks) * s.chunk_len;
  u.end = u.base + min(s.n, (u.slot % s.chunks + 1) * s.chunk_len);
  u.lane = threadIdx.x % 32;
  return true;
}

// The warp-wide sum of term(i) over the unit's entries i.
template <typename Term>
__device__ __forceinline__ float unit_sum(const Unit& u, Term term) {
  float acc = 0.f;
  for (int64_t i = u.begin + u.lane; i < u.end; i += 32) acc += term(i);
  return warp_sum(acc);
}

// sigmoid(x[i] / T) on a valid entry, else 0.
template <typename E>
__device__ __forceinline__ float weight(const E* x, const uint8_t* valid, int64_t i, float inv_t) {
  return is_valid(valid, i) ? sigmoid(to_float(x[i]) * inv_t) : 0.f;
}

// out[row] = sum_c part[row, c] for part: (rows, cols); one warp per row.
__global__ void row_sum_kernel(const float* part, float* out, int64_t rows, int64_t cols) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  float acc = 0.f;
  for (int64_t c = threadIdx.x % 32; c < cols; c += 32) acc += part[row * cols + c];
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) out[row] = acc;
}

// lse[row] from the chunk maxima and rescaled sums of exp, (rows, cols) each; 0 for no valid entry.
__global__ void row_lse_kernel(const float* part_max, const float* part_exp, float* lse, int64_t rows, int64_t cols) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  float m = -INFINITY, l = 0.f;
  for (int64_t c = threadIdx.x % 32; c < cols; c += 32) merge_exp(m, l, part_max[row * cols + c], part_exp[row * cols + c]);
  warp_merge_exp(m, l);
  if (threadIdx.x % 32 == 0) lse[row] = l > 0.f ? m + logf(l) : 0.f;
}

template <typename E>
__global__ void nsf_partials_kernel(const E* s, const uint8_t* valid, float* part, Shape shape) {
  Unit u;
  if (!warp_unit(shape, u)) return;
  const float acc = unit_sum(u, [&](int64_t i) { return weight(s, valid, i, shape.inv_t); });
  if (u.lane == 0) part[u.slot] = acc;
}

template <typename E>
__global__ void nsf_output_kernel(const E* s, const uint8_t* valid, const float* row_sum, E* out, Shape shape) {
  Unit u;
  if (!warp_unit(shape, u)) return;
  const float scale = 1.f / (row_sum[u.row] + kEps);
  for (int64_t i = u.begin + u.lane; i < u.end; i += 32) out[i] = from_float<E>(weight(s, valid, i, shape.inv_t) * scale);
}

template <typename E>
__global__ void nsf_grad_partials_kernel(const E* s, const uint8_t* valid, const float* row_sum, const E* g,
                                         float* part, Shape shape) {
  Unit u;
  if (!warp_unit(shape, u)) return;
  const float scale = 1.f / (row_sum[u.row] + kEps);
  const float acc = unit_sum(u, [&](int64_t i) {
    return is_valid(valid, i) ? weight(s, valid, i, shape.inv_t) * scale * to_float(g[i]) : 0.f;
  });
  if (u.lane == 0) part[u.slot] = acc;
}

template <typename E>
__global__ void nsf_grad_kernel(const E* s, const uint8_t* valid, const float* row_sum, const float* row_dot,
                                const E* g, E* ds, Shape shape) {
  Unit u;
  if (!warp_unit(shape, u)) return;
  const float scale = shape.inv_t / (row_sum[u.row] + kEps);
  const float dot = row_dot[u.row];
  for (int64_t i = u.begin + u.lane; i < u.end; i += 32) {
    const float w = weight(s, valid, i, shape.inv_t);
    ds[i] = from_float<E>(is_valid(valid, i) ? w * (1.f - w) * scale * (to_float(g[i]) - dot) : 0.f);
  }
}

// Per (row, chunk): online max, sum of exp(online - max) and sum of sigmoid(anchor / T), valid entries only.
// part: 3 planes of (rows, chunks): max, exp, anchor.
template <typename E>
__global__ void kl_partials_kernel(const E* o, const E* a, const uint8_t* valid, float* part, Shape shape) {
  Unit u;
  if (!warp_unit(shape, u)) return;
  float m = -INFINITY, l = 0.f, anchor = 0.f;
  for (int64_t i = u.begin + u.lane; i < u.end; i += 32) {
    if (!is_valid(valid, i)) continue;
    anchor += sigmoid(to_float(a[i]) * shape.inv_t);
    merge_exp(m, l, to_float(o[i]), 1.f);
  }
  warp_merge_exp(m, l);
  anchor = warp_sum(anchor);
  if (u.lane == 0) {
    const int64_t plane = shape.rows * shape.chunks;
    part[u.slot] = m;
    part[plane + u.slot] = l;
    part[2 * plane + u.slot] = anchor;
  }
}

template <typename E>
__global__ void kl_loss_partials_kernel(const E* o, const E* a, const uint8_t* valid, const float* lse,
                                        const float* row_anchor, float* part, Shape shape) {
  Unit u;
  if (!warp_unit(shape, u)) return;
  const float scale = 1.f / (row_anchor[u.row] + kEps);
  const float row_lse = lse[u.row];
  const float acc = unit_sum(u, [&](int64_t i) {
    return is_valid(valid, i) ? weight(a, valid, i, shape.inv_t) * scale * (to_float(o[i]) - row_lse) : 0.f;
  });
  if (u.lane == 0) part[u.slot] = acc;
}

template <typename E>
__global__ void kl_grad_kernel(const E* o, const E* a, const uint8_t* valid, const float* lse, const float* row_anchor,
                               const float* row_loss, const float* coef, E* d_o, E* d_a, Shape shape) {
  Unit u;
  if (!warp_unit(shape, u)) return;
  const float c = *coef;
  const float scale = 1.f / (row_anchor[u.row] + kEps);
  const float total_p = row_anchor[u.row] * scale;
  const float row_lse = lse[u.row];
  const float loss = row_loss[u.row];
  for (int64_t i = u.begin + u.lane; i < u.end; i += 32) {
    const bool ok = is_valid(valid, i);
    const float w = weight(a, valid, i, shape.inv_t);
    const float log_p = to_float(o[i]) - row_lse;
    if (d_o != nullptr) d_o[i] = from_float<E>(ok ? c * (expf(log_p) * total_p - w * scale) : 0.f);
    if (d_a != nullptr) d_a[i] = from_float<E>(ok ? c * w * (1.f - w) * shape.inv_t * scale * (loss - log_p) : 0.f);
  }
}

// Host side.

unsigned blocks_for(int64_t units) { return static_cast<unsigned>((units + kWarps - 1) / kWarps); }

const char* invalid_rows(const RowsArgs& args) {
  if (args.rows < 1 || args.n < 1) return "nsf: rows and n must be at least 1";
  if (args.chunks < 1 || args.chunks > args.n) return "nsf: chunks must be in [1, n]";
  if (args.rows > INT64_MAX / args.chunks || (args.rows * args.chunks + kWarps - 1) / kWarps > INT_MAX)
    return "nsf: rows * chunks exceeds the grid limit";
  if (!(args.inv_temperature > 0.f) || !std::isfinite(args.inv_temperature))
    return "nsf: inv_temperature must be positive and finite";
  if (args.dtype != DType::kFloat32 && args.dtype != DType::kFloat16 && args.dtype != DType::kBFloat16)
    return "nsf: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)";
  return nullptr;
}

bool any_null(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (p == nullptr) return true;
  return false;
}

Shape shape_of(const RowsArgs& args) {
  return Shape{args.rows, args.n, args.chunks, (args.n + args.chunks - 1) / args.chunks, args.inv_temperature};
}

// Runs launch(E{}) with E the element type of args.dtype; the CUDA error of the launches, or nullptr.
template <typename Launch>
const char* with_dtype(const RowsArgs& args, Launch launch) {
  switch (args.dtype) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    default: launch(__nv_bfloat16{}); break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename E>
const E* typed(const void* p) { return static_cast<const E*>(p); }
template <typename E>
E* typed(void* p) { return static_cast<E*>(p); }

void row_sums(const float* part, float* out, int64_t rows, int64_t cols, cudaStream_t stream) {
  row_sum_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(part, out, rows, cols);
}

}  // namespace

const char* launch_nsf_forward(const void* scores, const uint8_t* valid, void* out, float* workspace,
                               float* row_sum, const RowsArgs& args, void* stream) {
  if (const char* problem = invalid_rows(args)) return problem;
  if (any_null({scores, out, workspace, row_sum})) return "nsf_forward: null pointer";
  const auto st = static_cast<cudaStream_t>(stream);
  const Shape shape = shape_of(args);
  const unsigned grid = blocks_for(args.rows * args.chunks);
  return with_dtype(args, [&](auto tag) {
    using E = decltype(tag);
    nsf_partials_kernel<E><<<grid, kThreads, 0, st>>>(typed<E>(scores), valid, workspace, shape);
    row_sums(workspace, row_sum, args.rows, args.chunks, st);
    nsf_output_kernel<E><<<grid, kThreads, 0, st>>>(typed<E>(scores), valid, row_sum, typed<E>(out), shape);
  });
}

const char* launch_nsf_backward(const void* scores, const uint8_t* valid, const float* row_sum,
                                const void* grad_out, void* grad_scores, float* workspace,
                                float* row_dot, const RowsArgs& args, void* stream) {
  if (const char* problem = invalid_rows(args)) return problem;
  if (any_null({scores, row_sum, grad_out, grad_scores, workspace, row_dot})) return "nsf_backward: null pointer";
  const auto st = static_cast<cudaStream_t>(stream);
  const Shape shape = shape_of(args);
  const unsigned grid = blocks_for(args.rows * args.chunks);
  return with_dtype(args, [&](auto tag) {
    using E = decltype(tag);
    nsf_grad_partials_kernel<E><<<grid, kThreads, 0, st>>>(typed<E>(scores), valid, row_sum, typed<E>(grad_out),
                                                           workspace, shape);
    row_sums(workspace, row_dot, args.rows, args.chunks, st);
    nsf_grad_kernel<E><<<grid, kThreads, 0, st>>>(typed<E>(scores), valid, row_sum, row_dot, typed<E>(grad_out),
                                                  typed<E>(grad_scores), shape);
  });
}

const char* launch_anchor_kl_forward(const void* online, const void* anchor, const uint8_t* valid,
                                     float* workspace, float* lse, float* row_anchor, float* row_loss,
                                     float* total, const RowsArgs& args, void* stream) {
  if (const char* problem = invalid_rows(args)) return problem;
  if (any_null({online, anchor, workspace, lse, row_anchor, row_loss, total})) return "anchor_kl_forward: null pointer";
  const auto st = static_cast<cudaStream_t>(stream);
  const Shape shape = shape_of(args);
  const int64_t plane = args.rows * args.chunks;
  const unsigned grid = blocks_for(plane);
  return with_dtype(args, [&](auto tag) {
    using E = decltype(tag);
    kl_partials_kernel<E><<<grid, kThreads, 0, st>>>(typed<E>(online), typed<E>(anchor), valid, workspace, shape);
    row_lse_kernel<<<blocks_for(args.rows), kThreads, 0, st>>>(workspace, workspace + plane, lse, args.rows, args.chunks);
    row_sums(workspace + 2 * plane, row_anchor, args.rows, args.chunks, st);
    kl_loss_partials_kernel<E><<<grid, kThreads, 0, st>>>(typed<E>(online), typed<E>(anchor), valid, lse, row_anchor,
                                                          workspace + 3 * plane, shape);
    row_sums(workspace + 3 * plane, row_loss, args.rows, args.chunks, st);
    row_sums(row_loss, total, 1, args.rows, st);
  });
}

const char* launch_anchor_kl_backward(const void* online, const void* anchor, const uint8_t* valid,
                                      const float* lse, const float* row_anchor, const float* row_loss,
                                      const float* coef, void* grad_online, void* grad_anchor,
                                      const RowsArgs& args, void* stream) {
  if (const char* problem = invalid_rows(args)) return problem;
  if (any_null({online, anchor, lse, row_anchor, row_loss, coef})) return "anchor_kl_backward: null pointer";
  if (grad_online == nullptr && grad_anchor == nullptr) return nullptr;
  const auto st = static_cast<cudaStream_t>(stream);
  const Shape shape = shape_of(args);
  return with_dtype(args, [&](auto tag) {
    using E = decltype(tag);
    kl_grad_kernel<E><<<blocks_for(args.rows * args.chunks), kThreads, 0, st>>>(
        typed<E>(online), typed<E>(anchor), valid, lse, row_anchor, row_loss, coef, typed<E>(grad_online),
        typed<E>(grad_anchor), shape);
  });
}

}  // namespace milkernels
