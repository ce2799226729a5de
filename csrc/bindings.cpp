// pybind11 module milkernels._C: the CUDA kernels called with raw device pointers (ints, 0 = null)
// and a cudaStream_t handle (an int). It includes no torch header, so it is free of torch's C++ ABI.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "gated_attention.h"
#include "nsf.h"

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

void check(const char* problem) {
  if (problem) throw std::runtime_error(problem);
}

const uint8_t* bytes(uintptr_t address) { return reinterpret_cast<const uint8_t*>(address); }
float* floats(uintptr_t address) { return reinterpret_cast<float*>(address); }
void* mutable_pointer(uintptr_t address) { return reinterpret_cast<void*>(address); }

milkernels::RowsArgs rows_args(int64_t rows, int64_t n, int64_t chunks, float inv_temperature, int dtype) {
  return milkernels::RowsArgs{rows, n, chunks, inv_temperature, static_cast<milkernels::DType>(dtype)};
}

void nsf_forward(uintptr_t scores, uintptr_t valid, uintptr_t out, uintptr_t workspace, uintptr_t row_sum,
                 int64_t rows, int64_t n, int64_t chunks, float inv_temperature, int dtype, uintptr_t stream) {
  check(milkernels::launch_nsf_forward(pointer(scores), bytes(valid), mutable_pointer(out), floats(workspace),
                                       floats(row_sum), rows_args(rows, n, chunks, inv_temperature, dtype),
                                       mutable_pointer(stream)));
}

void nsf_backward(uintptr_t scores, uintptr_t valid, uintptr_t row_sum, uintptr_t grad_out, uintptr_t grad_scores,
                  uintptr_t workspace, uintptr_t row_dot, int64_t rows, int64_t n, int64_t chunks,
                  float inv_temperature, int dtype, uintptr_t stream) {
  check(milkernels::launch_nsf_backward(pointer(scores), bytes(valid), floats(row_sum), pointer(grad_out),
                                        mutable_pointer(grad_scores), floats(workspace), floats(row_dot),
                                        rows_args(rows, n, chunks, inv_temperature, dtype), mutable_pointer(stream)));
}

void anchor_kl_forward(uintptr_t online, uintptr_t anchor, uintptr_t valid, uintptr_t workspace, uintptr_t lse,
                       uintptr_t row_anchor, uintptr_t row_loss, uintptr_t total, int64_t rows, int64_t n,
                       int64_t chunks, float inv_temperature, int dtype, uintptr_t stream) {
  check(milkernels::launch_anchor_kl_forward(pointer(online), pointer(anchor), bytes(valid), floats(workspace),
                                             floats(lse), floats(row_anchor), floats(row_loss), floats(total),
                                             rows_args(rows, n, chunks, inv_temperature, dtype),
                                             mutable_pointer(stream)));
}

void anchor_kl_backward(uintptr_t online, uintptr_t anchor, uintptr_t valid, uintptr_t lse, uintptr_t row_anchor,
                        uintptr_t row_loss, uintptr_t coef, uintptr_t grad_online, uintptr_t grad_anchor,
                        int64_t rows, int64_t n, int64_t chunks, float inv_temperature, int dtype,
                        uintptr_t stream) {
  check(milkernels::launch_anchor_kl_backward(pointer(online), pointer(anchor), bytes(valid), floats(lse),
                                              floats(row_anchor), floats(row_loss), floats(coef),
                                              mutable_pointer(grad_online), mutable_pointer(grad_anchor),
                                              rows_args(rows, n, chunks, inv_temperature, dtype),
                                              mutable_pointer(stream)));
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
  const char* rows_doc =
      "Rows (rows, n) row-major, contiguous, in dtype 0 = float32, 1 = float16, 2 = bfloat16; valid is\n"
      "(rows, n) bytes (nonzero = real) or 0 (all real); chunks (1..n) warps share a row. Pointers are\n"
      "ints. Raises RuntimeError on an invalid argument or a CUDA launch error. See csrc/nsf.h.";
  m.def("nsf_forward", &nsf_forward, py::call_guard<py::gil_scoped_release>(),
        py::arg("scores"), py::arg("valid"), py::arg("out"), py::arg("workspace"), py::arg("row_sum"),
        py::arg("rows"), py::arg("n"), py::arg("chunks"), py::arg("inv_temperature"), py::arg("dtype"),
        py::arg("stream"), rows_doc);
  m.def("nsf_backward", &nsf_backward, py::call_guard<py::gil_scoped_release>(),
        py::arg("scores"), py::arg("valid"), py::arg("row_sum"), py::arg("grad_out"), py::arg("grad_scores"),
        py::arg("workspace"), py::arg("row_dot"), py::arg("rows"), py::arg("n"), py::arg("chunks"),
        py::arg("inv_temperature"), py::arg("dtype"), py::arg("stream"), rows_doc);
  m.def("anchor_kl_forward", &anchor_kl_forward, py::call_guard<py::gil_scoped_release>(),
        py::arg("online"), py::arg("anchor"), py::arg("valid"), py::arg("workspace"), py::arg("lse"),
        py::arg("row_anchor"), py::arg("row_loss"), py::arg("total"), py::arg("rows"), py::arg("n"),
        py::arg("chunks"), py::arg("inv_temperature"), py::arg("dtype"), py::arg("stream"), rows_doc);
  m.def("anchor_kl_backward", &anchor_kl_backward, py::call_guard<py::gil_scoped_release>(),
        py::arg("online"), py::arg("anchor"), py::arg("valid"), py::arg("lse"), py::arg("row_anchor"),
        py::arg("row_loss"), py::arg("coef"), py::arg("grad_online"), py::arg("grad_anchor"), py::arg("rows"),
        py::arg("n"), py::arg("chunks"), py::arg("inv_temperature"), py::arg("dtype"), py::arg("stream"),
        rows_doc);
}
