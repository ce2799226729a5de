// Fused forward scoring kernel of gated attention on tensor cores (WMMA).
//
//   s = (tanh(x wa^T + ba) * sigmoid(x wb^T + bb)) wc^T + bc,   x: (T, L), s: (T, K) float32
//
// A block owns kRows rows of x and kHeads heads. It walks the hidden units D in chunks of kHidden:
// for each chunk it projects its rows onto wa and wb, streaming L through shared memory kDepth
// features at a time, gates the two projections and multiplies the gated chunk into the scores.
// Nothing of size T x D ever reaches global memory. Warp w owns rows 16w..16w+15 of the block.
// float16 and bfloat16 run WMMA m16n16k16; float32 runs tf32 m16n16k8 with the 3xTF32 split
// (hi * hi + hi * lo + lo * hi), which keeps float32 accuracy. Accumulation is float32 throughout.

#include "gated_attention.h"
#include "common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace milkernels {
namespace {

using namespace nvcuda;

constexpr int kRows = 64;    // rows of x per block
constexpr int kHidden = 64;  // hidden units per chunk of D
constexpr int kDepth = 32;   // features of L per shared-memory stage
constexpr int kHeads = 16;   // heads per block (one 16-wide accumulator tile)
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kFrags = kHidden / 16;  // 16 x 16 accumulator tiles per warp and branch
constexpr int kMaxGridY = 65535;

static_assert(kRows == 16 * kWarps, "each warp owns one 16-row strip");

// Tensor-core tiles for 16-bit elements: A (16 x kStep) row-major, B (kStep x 16) column-major.
template <typename E>
struct TensorCore {
  static constexpr int kStep = 16;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  struct A {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> f;
    __device__ void load(const E* p, unsigned ld) { wmma::load_matrix_sync(f, p, ld); }
  };
  struct B {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> f;
    __device__ void load(const E* p, unsigned ld) { wmma::load_matrix_sync(f, p, ld); }
  };
  static __device__ void mma(Acc& c, const A& a, const B& b) { wmma::mma_sync(c, a.f, b.f, c); }
};

// float32 on tf32 tensor cores: each operand is split into hi = tf32(v) and lo = tf32(v - hi).
template <>
struct TensorCore<float> {
  static constexpr int kStep = 8;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <typename Frag>
  struct Split {
    Frag hi, lo;
    __device__ void load(const float* p, unsigned ld) {
      wmma::load_matrix_sync(hi, p, ld);
#pragma unroll
      for (int i = 0; i < hi.num_elements; ++i) {
        const float v = hi.x[i];
        hi.x[i] = wmma::__float_to_tf32(v);
        lo.x[i] = wmma::__float_to_tf32(v - hi.x[i]);
      }
    }
  };
  using A = Split<wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>>;
  using B = Split<wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>>;
  static __device__ void mma(Acc& c, const A& a, const B& b) {
    wmma::mma_sync(c, a.lo, b.hi, c);
    wmma::mma_sync(c, a.hi, b.lo, c);
    wmma::mma_sync(c, a.hi, b.hi, c);
  }
};

// Shared memory of a block. Rows are padded by 16 bytes to spread them over the banks; every
// WMMA tile starts on a 32-byte boundary. The epilogue buffers reuse the operand tiles' space.
template <typename E>
struct Shared {
  static constexpr int kPad = 16 / sizeof(E);
  static constexpr int kLdOperand = kDepth + kPad;
  static constexpr int kLdGated = kHidden + kPad;
  static constexpr int kLdStage = kHidden + 4;
  struct Operands {
    alignas(32) E x[kRows][kLdOperand];
    alignas(32) E wa[kHidden][kLdOperand];
    alignas(32) E wb[kHidden][kLdOperand];
  };
  struct Epilogue {
    alignas(32) float stage[kRows][kLdStage];  // accumulators on their way out of registers
    alignas(32) E gated[kRows][kLdGated];      // tanh(.) * sigmoid(.), the A operand against wc
  };
  union {
    Operands op;
    Epilogue ep;
  };
  alignas(32) E wc[kHeads][kLdGated];
  float ba[kHidden];
  float bb[kHidden];
};

template <typename E>
using Acc = typename TensorCore<E>::Acc;

// Copy a kTileRows x kTileCols tile of the row-major `src` (row stride src_ld) into `dst`,
// zero-filling past `rows` x `cols`. 16-byte vector loads where the source allows them.
template <int kTileRows, int kTileCols, int kLd, typename E>
__device__ __forceinline__ void load_tile(E (*dst)[kLd], const E* src, int64_t src_ld, int64_t rows,
                                          int64_t cols) {
  constexpr int kVec = 16 / sizeof(E);
  constexpr int kVecsPerRow = kTileCols / kVec;
  static_assert(kTileCols % kVec == 0, "tile rows are whole vectors");
  for (int i = threadIdx.x; i < kTileRows * kVecsPerRow; i += kThreads) {
    const int r = i / kVecsPerRow;
    const int c = i % kVecsPerRow * kVec;
    const E* from = src + r * src_ld + c;
    E* to = &dst[r][c];
    if (r < rows && c + kVec <= cols && reinterpret_cast<uintptr_t>(from) % 16 == 0) {
      *reinterpret_cast<uint4*>(to) = __ldg(reinterpret_cast<const uint4*>(from));
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) to[v] = r < rows && c + v < cols ? from[v] : from_float<E>(0.f);
    }
  }
}

// bias[i] as float, 0 past the end or for a missing bias.
template <typename E>
__device__ __forceinline__ float bias_at(const void* bias, int64_t i, int64_t n) {
  return bias != nullptr && i < n ? to_float(static_cast<const E*>(bias)[i]) : 0.f;
}

// The chunk's slice of wc (heads k0.., hidden units d0..) and of the biases ba, bb.
template <typename E>
__device__ void load_chunk_constants(Shared<E>& sm, const GatedScoresArgs& a, int64_t d0, int64_t k0) {
  const E* wc = static_cast<const E*>(a.wc) + k0 * a.D + d0;
  load_tile<kHeads, kHidden>(sm.wc, wc, a.D, a.K - k0, a.D - d0);
  for (int i = threadIdx.x; i < kHidden; i += kThreads) {
    sm.ba[i] = bias_at<E>(a.ba, d0 + i, a.D);
    sm.bb[i] = bias_at<E>(a.bb, d0 + i, a.D);
  }
}

// acc_a = x wa^T and acc_b = x wb^T over the warp's 16 rows and the chunk's hidden units d0...
template <typename E, bool kGated>
__device__ void project(Shared<E>& sm, const GatedScoresArgs& a, int64_t row0, int64_t d0, int warp,
                        Acc<E> (&acc_a)[kFrags], Acc<E> (&acc_b)[kFrags]) {
  using TC = TensorCore<E>;
  constexpr int kLd = Shared<E>::kLdOperand;
#pragma unroll
  for (int j = 0; j < kFrags; ++j) {
    wmma::fill_fragment(acc_a[j], 0.f);
    wmma::fill_fragment(acc_b[j], 0.f);
  }
  const E* x = static_cast<const E*>(a.x) + row0 * a.L;
  const E* wa = static_cast<const E*>(a.wa) + d0 * a.L;
  const E* wb = kGated ? static_cast<const E*>(a.wb) + d0 * a.L : nullptr;
  for (int64_t l0 = 0; l0 < a.L; l0 += kDepth) {
    __syncthreads();  // every warp is done reading the previous stage
    load_tile<kRows, kDepth>(sm.op.x, x + l0, a.L, a.T - row0, a.L - l0);
    load_tile<kHidden, kDepth>(sm.op.wa, wa + l0, a.L, a.D - d0, a.L - l0);
    if (kGated) load_tile<kHidden, kDepth>(sm.op.wb, wb + l0, a.L, a.D - d0, a.L - l0);
    __syncthreads();
#pragma unroll 1  // unrolling this loop too costs registers, and the float32 path spills
    for (int kk = 0; kk < kDepth; kk += TC::kStep) {
      typename TC::A rows;
      rows.load(&sm.op.x[16 * warp][kk], kLd);
#pragma unroll
      for (int j = 0; j < kFrags; ++j) {
        typename TC::B w;
        w.load(&sm.op.wa[16 * j][kk], kLd);
        TC::mma(acc_a[j], rows, w);
        if (kGated) {
          w.load(&sm.op.wb[16 * j][kk], kLd);
          TC::mma(acc_b[j], rows, w);
        }
      }
    }
  }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// The warp's 16 x kHidden strip of a 16 x 16 tiles into the float staging rows.
template <typename E>
__device__ __forceinline__ void stage_strip(float (*stage)[Shared<E>::kLdStage], const Acc<E> (&acc)[kFrags]) {
#pragma unroll
  for (int j = 0; j < kFrags; ++j)
    wmma::store_matrix_sync(&stage[0][16 * j], acc[j], Shared<E>::kLdStage, wmma::mem_row_major);
  __syncwarp();
}

// gated = tanh(acc_a + ba) * sigmoid(acc_b + bb) for the warp's rows, written as E for the wc product.
template <typename E, bool kGated>
__device__ void gate(Shared<E>& sm, const Acc<E> (&acc_a)[kFrags], const Acc<E> (&acc_b)[kFrags], int warp) {
  constexpr int kPerLane = 16 * kHidden / 32;
  const int lane = threadIdx.x % 32;
  float(*stage)[Shared<E>::kLdStage] = &sm.ep.stage[16 * warp];
  E(*gated)[Shared<E>::kLdGated] = &sm.ep.gated[16 * warp];
  float g[kPerLane];
  stage_strip<E>(stage, acc_a);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int r = (32 * i + lane) / kHidden, c = (32 * i + lane) % kHidden;
    g[i] = tanhf(stage[r][c] + sm.ba[c]);
  }
  if (kGated) {
    __syncwarp();  // every lane has read a before b overwrites it
    stage_strip<E>(stage, acc_b);
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int r = (32 * i + lane) / kHidden, c = (32 * i + lane) % kHidden;
    if (kGated) g[i] *= sigmoid(stage[r][c] + sm.bb[c]);
    gated[r][c] = from_float<E>(g[i]);
  }
  __syncwarp();
}

// scores += gated (16 x kHidden, the warp's rows) x wc^T (kHidden x kHeads).
template <typename E>
__device__ void accumulate_scores(Shared<E>& sm, Acc<E>& scores, int warp) {
  using TC = TensorCore<E>;
  constexpr int kLd = Shared<E>::kLdGated;
#pragma unroll
  for (int kk = 0; kk < kHidden; kk += TC::kStep) {
    typename TC::A g;
    typename TC::B w;
    g.load(&sm.ep.gated[16 * warp][kk], kLd);
    w.load(&sm.wc[0][kk], kLd);
    TC::mma(scores, g, w);
  }
}

// out[row, head] = scores + bc for the warp's rows that exist and the block's heads that exist.
template <typename E>
__device__ void write_scores(Shared<E>& sm, const GatedScoresArgs& a, const Acc<E>& scores, int64_t row0,
                             int64_t k0, int warp) {
  constexpr int kLd = Shared<E>::kLdStage;
  float(*stage)[kLd] = &sm.ep.stage[16 * warp];
  wmma::store_matrix_sync(&stage[0][0], scores, kLd, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x % 32; e < 16 * kHeads; e += 32) {
    const int r = e / kHeads, k = e % kHeads;
    const int64_t row = row0 + 16 * warp + r, head = k0 + k;
    if (row < a.T && head < a.K) a.out[row * a.K + head] = stage[r][k] + bias_at<E>(a.bc, head, a.K);
  }
}

// Scores of rows row0.. (kRows of them) for heads k0.. (kHeads of them).
template <typename E, bool kGated>
__device__ void score_tile(Shared<E>& sm, const GatedScoresArgs& a, int64_t row0, int64_t k0) {
  const int warp = threadIdx.x / 32;
  Acc<E> scores;
  wmma::fill_fragment(scores, 0.f);
  for (int64_t d0 = 0; d0 < a.D; d0 += kHidden) {
    __syncthreads();  // every warp is done with the previous chunk's wc and epilogue
    load_chunk_constants(sm, a, d0, k0);
    Acc<E> acc_a[kFrags], acc_b[kFrags];
    project<E, kGated>(sm, a, row0, d0, warp, acc_a, acc_b);
    __syncthreads();  // the operand tiles are dead: the epilogue reuses their space
    gate<E, kGated>(sm, acc_a, acc_b, warp);
    accumulate_scores(sm, scores, warp);
  }
  write_scores(sm, a, scores, row0, k0, warp);
}

template <typename E, bool kGated>
__global__ void __launch_bounds__(kThreads) gated_scores_kernel(const GatedScoresArgs a) {
  __shared__ Shared<E> sm;
  for (int64_t row0 = int64_t{blockIdx.x} * kRows; row0 < a.T; row0 += int64_t{gridDim.x} * kRows)
    for (int64_t k0 = int64_t{blockIdx.y} * kHeads; k0 < a.K; k0 += int64_t{gridDim.y} * kHeads)
      score_tile<E, kGated>(sm, a, row0, k0);
}

template <typename E>
cudaError_t launch(const GatedScoresArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((a.T + kRows - 1) / kRows, INT_MAX)),
                  static_cast<unsigned>(std::min<int64_t>((a.K + kHeads - 1) / kHeads, kMaxGridY)));
  if (a.wb != nullptr)
    gated_scores_kernel<E, true><<<grid, kThreads, 0, stream>>>(a);
  else
    gated_scores_kernel<E, false><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

const char* invalid_argument(const GatedScoresArgs& a) {
  if (a.x == nullptr || a.wa == nullptr || a.wc == nullptr || a.out == nullptr)
    return "gated_scores: x, wa, wc and out must be device pointers, got a null pointer";
  if (a.T < 1 || a.L < 1 || a.D < 1 || a.K < 1) return "gated_scores: T, L, D and K must all be >= 1";
  if (a.bb != nullptr && a.wb == nullptr) return "gated_scores: bb given without wb";
  return nullptr;
}

}  // namespace

const char* launch_gated_scores(const GatedScoresArgs& args, void* stream) {
  if (const char* problem = invalid_argument(args)) return problem;
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (args.dtype) {
    case DType::kFloat32: err = launch<float>(args, s); break;
    case DType::kFloat16: err = launch<__half>(args, s); break;
    case DType::kBFloat16: err = launch<__nv_bfloat16>(args, s); break;
    default: return "gated_scores: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace milkernels
