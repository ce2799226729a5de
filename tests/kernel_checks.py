"""Checks shared by the op tests: backprop fixed cotangents, compare a backend with the float64 reference,
compile without graph breaks, refuse double backward, list the Triton kernels launched."""

import collections
import contextlib
import dataclasses

import pytest
import torch

import milkernels
from milkernels import _backends
from milkernels.bench.traffic import Counts, counting

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
        assert got.shape == want.shape, name
        if not got.numel():
            continue
        assert not got.isnan().any(), name
        same_infinity = got.isinf() & (got.double() == want)  # e.g. a log-sum-exp of -inf where nothing is reached
        assert (got.isinf() == want.isinf()).all(), f"{name}: infinities differ"
        finite = want.masked_fill(same_infinity, 0)
        scale = finite.abs().max().clamp_min(1.0)
        err = (got.double().masked_fill(same_infinity, 0) - finite).abs().max() / scale
        assert err < TOLERANCE[dtype], f"{name} error {err:.2e}"


def assert_compiles_without_graph_break(fn, inputs, backend, **kwargs):
    """On ``backend``, ``torch.compile(fn, fullgraph=True)`` gives eager's outputs and gradients (the same
    ``torch.manual_seed`` before each, for dropout) and ``torch._dynamo.explain`` counts no graph break."""
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    results = []
    with milkernels.use_backend(backend):
        for run in (fn, compiled):
            torch.manual_seed(0)
            results.append(outputs_and_grads(run, inputs, **kwargs))
        explained = torch._dynamo.explain(fn)(*inputs, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    (eager_out, eager_grad), (compiled_out, compiled_grad) = results
    for got, want in zip(compiled_out + compiled_grad, eager_out + eager_grad):
        torch.testing.assert_close(got, want)


def assert_double_backward_raises(fn, inputs, public_name, **kwargs):
    """A gradient penalty through ``fn(*inputs, **kwargs)`` on the triton backend raises the custom op's
    error naming ``milkernels.<public_name>``, instead of a silently wrong second derivative."""
    with milkernels.use_backend("triton"):
        outs = fn(*inputs, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum(o.float().square().sum() for o in outs if o is not None)
    grads = torch.autograd.grad(loss, leaves(inputs), create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match=rf"milkernels\.{public_name}: double backward .* is not supported"):
        penalty.backward()


def opcheck_attention_ops(forward_op, backward_op, args, backward_options=None):
    """``torch.library.opcheck`` of an attention forward op on ``args = [q, k, v, *options]`` (returning ``(out,
    lse, *saved)``), then of its backward op on ``[q, k, v, out, lse, *saved, d_out, *backward_options]`` (by default
    the forward's options)."""
    torch.library.opcheck(forward_op, args)
    with torch.no_grad():
        outputs = forward_op(*args)
    detached = [t.detach() for t in args[:3]]
    options = args[3:] if backward_options is None else backward_options
    torch.library.opcheck(backward_op, [*detached, *outputs, torch.randn_like(outputs[0]), *options])


@contextlib.contextmanager
def launched():
    """The Triton kernels launched inside the block, ``by_kernel[name].launches``: under the interpreter a
    :func:`milkernels.bench.traffic.counting` block (with its bytes and FLOPs), on a GPU (no interpreter to
    count bytes) the launches Triton's launch hook sees, so that a test of which kernels run also runs there."""
    if _backends.triton_interpreted():
        with counting() as counts:
            yield counts
        return
    import triton

    launches = _Launches()
    triton.knobs.runtime.launch_enter_hook.add(launches.record)
    try:
        yield launches
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(launches.record)


@dataclasses.dataclass
class _Launches:
    """Launches by kernel name, as :class:`Counts` holds them (only ``launches`` set)."""

    by_kernel: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(Counts))

    def record(self, metadata) -> None:
        self.by_kernel[metadata.get()["name"]].launches += 1


def record_block_tables(monkeypatch, kernels_module) -> list:
    """A list that gets ``(rows of the bags, rows a block)`` for each block table ``kernels_module`` builds
    from then on (each one a host-to-device copy)."""
    from milkernels.ops import _blocks

    built = []

    def recording(bounds, block_rows, device):
        built.append((bounds[-1], block_rows))
        return _blocks.block_table(bounds, block_rows, device)

    monkeypatch.setattr(kernels_module, "block_table", recording)
    return built
