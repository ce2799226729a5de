// Fused forward scoring kernel of gated attention. Plain C++ interface: no torch and no CUDA
// headers, so the pybind11 binding compiles with the host compiler alone.
#pragma once

#include <cstdint>

namespace milkernels {

// Element type of x and the weights (the output is always float32).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Device pointers and sizes of one call. Rows x: (T, L) row-major; wa, wb: (D, L); ba, bb: (D,);
// wc: (K, D); bc: (K,); out: (T, K) float32, all contiguous. wb == nullptr is the ungated form
// (b = 1); any bias may be nullptr (zero).
struct GatedScoresArgs {
  const void* x;
  const void* wa;
  const void* ba;
  const void* wb;
  const void* bb;
  const void* wc;
  const void* bc;
  float* out;
  int64_t T, L, D, K;
  DType dtype;
};

// Launch s = (tanh(x wa^T + ba) * sigmoid(x wb^T + bb)) wc^T + bc on `stream` (a cudaStream_t).
// Returns nullptr on success, else a static message naming the invalid argument or CUDA error.
const char* launch_gated_scores(const GatedScoresArgs& args, void* stream);

}  // namespace milkernels
