// pybind11 module milkernels._C: the CUDA kernels called with raw device pointers (ints, 0 = null)
// and a cudaStream_t handle (an int). It includes no torch header, so it is free of torch's C++ ABI.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "gated_attention.h"

namespace py = pybind11;

namespace {

const void* pointer(uintptr_t address) { return reinterpret_cast<const void*>(address); }

void gated_scores(uintptr_t x, uintptr_t wa, uintptr_t ba, uintptr_t wb, uintptr_t bb, uintptr_t wc,
                  uintptr_t bc, uintptr_t out, int64_t T, int64_t L, int64_t D, int64_t K, int dtype,
                  uintptr_t stream) {
  const milkernels::GatedScoresArgs args{
      pointer(x), pointer(wa), pointer(ba), pointer(wb), pointer(bb), pointer(wc), pointer(bc),
      reinterpret_cast<float*>(out), T, L, D, K, static_cast<milkernels::DType>(dtype)};
  if (const char* problem = milkernels::launch_gated_scores(args, reinterpret_cast<void*>(stream)))
    throw std::runtime_error(problem);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "milkernels CUDA kernels, called with raw device pointers; see milkernels.ops.*.cuda";
  m.def("gated_scores", &gated_scores, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("wa"), py::arg("ba"), py::arg("wb"), py::arg("bb"), py::arg("wc"),
        py::arg("bc"), py::arg("out"), py::arg("T"), py::arg("L"), py::arg("D"), py::arg("K"),
        py::arg("dtype"), py::arg("stream"),
        "Launch the gated attention scoring kernel on `stream`: out (T, K) float32 from x (T, L),\n"
        "wa, wb (D, L), ba, bb (D,), wc (K, D), bc (K,), all contiguous, in dtype 0 = float32,\n"
        "1 = float16 or 2 = bfloat16. Pointers are ints, 0 = null (wb = 0: ungated; a bias = 0: none).\n"
        "Raises RuntimeError on an invalid argument or a CUDA launch error.");
}
