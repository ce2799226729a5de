"""Checks shared by the op tests: backprop fixed cotangents, compare a backend with the float64 reference."""

import torch

import milkernels

TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def leaves(inputs):
    """The inputs that take a gradient."""
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def outputs_and_grads(fn, inputs, **kwargs):
    """Run ``fn(*inputs, **kwargs)``; backprop fixed random cotangents (by shape, not strides) into every input that needs it."""
    outs = fn(*inputs, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    generator = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(o.shape, generator=generator).to(o.device) for o in outs]
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents))
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves(inputs)))


def as_float64(inputs):
    """Float64 copies of the float tensors among ``inputs``, keeping requires_grad; other inputs as they are."""
    return [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point()
            else t for t in inputs]


def compare(fn, inputs, dtype, backend="triton", **kwargs):
    """``backend`` in ``dtype`` against the reference in float64: every output and every gradient."""
    with milkernels.use_backend(backend):
        got_out, got_grad = outputs_and_grads(fn, inputs, **kwargs)
    with milkernels.use_backend("reference"):
        want_out, want_grad = outputs_and_grads(fn, as_float64(inputs), **kwargs)
    names = [f"output {i}" for i in range(len(got_out))] + [f"grad {i}" for i in range(len(got_grad))]
    for name, got, want in zip(names, got_out + got_grad, want_out + want_grad):
        assert got.dtype == dtype, name
        assert not got.isnan().any(), name
        scale = want.abs().max().clamp_min(1.0)
        err = (got.double() - want).abs().max() / scale
        assert err < TOLERANCE[dtype], f"{name} error {err:.2e}"
