"""milkernels.zoo: every model's contract (build, forward, backward, profile_layers) and what swap fuses in it,
with the same logits and gradients after the swap."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import milkernels
from milkernels import zoo
from milkernels.zoo.gigapath import GigaPath, LongNetArgs, position_embedding
from test_nn import Case

IN_DIM, ROWS, CLASSES = 384, 11, 3  # 384: ASMIL gets its paper hidden size 128
PARAMETERS = {  # at the default dims, 2 classes
    "clam_sb": 788_739, "clam_mb": 788_996, "abmil": 641_887, "lin_mil": 13_137_954, "litemil": 559_490,
    "asmil": 9_994_754, "transmil": 2_672_146, "gigapath_slide_encoder": 86_332_418, "cma_mil": 363_208,
    "cma_mil_local": 363_208,
}
SWAPPED = {  # report group -> module names, for the models of built(name) (one layer where there are layers)
    "clam_sb": {"fused": ["attention_net.3"]},
    "clam_mb": {"fused": ["attention_net.3"]},
    "abmil": {"fused": ["attention_net.3"]},
    "lin_mil": {"fused": ["model", "model.transformer.0.attn"]},
    "litemil": {"replaced": ["stream.attn"]},
    "asmil": {"replaced": [*(f"sub_attention.{i}" for i in range(8)), "bag_attention"]},
    "transmil": {},
    "gigapath_slide_encoder": {"replaced": ["slide_encoder.encoder.layers.0.self_attn"]},
    "cma_mil": {"fused": ["model.cross_attn_5x_10x", "model.cross_attn_10x_20x", "model.cross_attn_20x_5x",
                          "model.attention_net"]},
}
SWAPPED["cma_mil_local"] = SWAPPED["cma_mil"]
SWAP_CASES = [Case("reference", torch.float64, (1e-9, 1e-9)), Case("triton", torch.float32, (2e-4, 2e-4))]
TRITON_SKIPPED = {"transmil": "nothing in it is swapped",
                  "gigapath_slide_encoder": "slow in the interpreter at E = 768: test_swapped_small_gigapath instead"}
# exact gradient 0: softmax is shift invariant (a score bias, a key bias); ASMIL's class token starts at 0;
# CMA-MIL's 5x stream has one instance in the test's bag, so 20x -> 5x attends to one key
ZERO_GRADIENT = ("attention_c.bias", "k_proj.bias", "bag_attention.q_proj.weight", "key.bias",
                 "cross_attn_20x_5x.query.weight", "cross_attn_20x_5x.query.bias", "cross_attn_20x_5x.key.weight")


def built(name, in_dim=IN_DIM, **options):
    """Zoo model ``name`` (one layer where it has layers), or a skip when its package does not import."""
    if zoo.has_layers(name):
        options.setdefault("layers", 1)
    try:
        return zoo.build(name, in_dim, **options)
    except ImportError as exc:
        pytest.skip(str(exc))


def small_gigapath():
    """A GigaPath of one layer, E = 48 over 4 heads and branches [8, 16, 32] x [1, 2, 4]."""
    return GigaPath(IN_DIM, CLASSES, layers=1, dim=48, heads=4, args=LongNetArgs([8, 16, 32], [1, 2, 4]))


def bag(dtype=torch.float32, rows=ROWS, in_dim=IN_DIM):
    """``(features: (rows, in_dim), coords: (rows, 2) int64 px)``, the features requiring grad; the coords are
    the first cells of a grid of 256 px patches 4 wide, shuffled (so every local CMA-MIL block has neighbours)."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(rows, in_dim, generator=generator, dtype=dtype).requires_grad_()
    cells = torch.randperm(rows, generator=generator)
    return features, torch.stack([cells % 4, cells // 4], dim=1) * 256


def logits_and_grads(model, features, coords):
    """``(logits, {name: gradient})`` of a random mix of the logits, w.r.t. the features and every parameter."""
    logits = model(features, coords)
    mix = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5)).to(logits)
    names, tensors = zip(*[("features", features), *model.named_parameters()])
    return logits, dict(zip(names, torch.autograd.grad((logits * mix).sum(), tensors)))


def calls_per_forward(model, names, inputs):
    """How many times each submodule of ``names`` is called in one forward."""
    calls = dict.fromkeys(names, 0)

    def counter(name):
        def count(*_):
            calls[name] += 1
        return count

    handles = [model.get_submodule(name).register_forward_hook(counter(name)) for name in names]
    model(*inputs)
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_forward_and_backward(name):
    torch.manual_seed(0)
    model = built(name, n_classes=CLASSES)
    features, coords = bag()
    for where in (coords, None):
        logits = model(features, where)
        assert logits.shape == (1, CLASSES) and logits.isfinite().all()
    logits.sum().backward()
    assert features.grad.isfinite().all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_profile_layers_resolve_are_disjoint_and_called_before_and_after_swap(name):
    torch.manual_seed(0)
    model = built(name).eval()
    names = model.profile_layers
    assert isinstance(names, tuple) and len(set(names)) == len(names)
    assert not [(a, b) for a in names for b in names if b.startswith(a + ".")]
    swapped = milkernels.swap(copy.deepcopy(model))
    assert swapped.profile_layers == names
    for candidate in (model, swapped):
        calls = calls_per_forward(candidate, names, bag())
        assert all(count >= 1 for count in calls.values()), calls


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_profile_layers_hold_nearly_all_flops_at_default_dims(name):
    in_dim = zoo.default_in_dim(name)
    model = built(name, in_dim).eval()
    with FlopCounterMode(display=False) as counter:
        model(*bag(rows=64, in_dim=in_dim))
    counts = {module: sum(ops.values()) for module, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    held = sum(counts.get(f"{root}.{layer}", 0) for layer in model.profile_layers)
    assert held >= 0.95 * counter.get_total_flops()


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_parameter_counts_at_default_dims(name):
    model = built(name, zoo.default_in_dim(name), layers=None)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


@pytest.mark.parametrize("case", SWAP_CASES, ids=lambda c: c.backend)
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_swap_fuses_and_keeps_logits_and_gradients(case, name):
    if case.backend == "triton" and name in TRITON_SKIPPED:
        pytest.skip(TRITON_SKIPPED[name])
    torch.manual_seed(0)
    model = built(name).to(case.dtype).eval()
    swapped = milkernels.swap(copy.deepcopy(model))
    report = milkernels.swap_report(swapped)
    groups = {group: list(modules) for group, modules in vars(report).items() if modules}
    assert groups == SWAPPED[name]
    assert_same_run(case, model, swapped, bag(case.dtype))


@pytest.mark.parametrize("case", SWAP_CASES, ids=lambda c: c.backend)
def test_swapped_small_gigapath_keeps_logits_and_gradients(case):
    torch.manual_seed(0)
    model = small_gigapath().to(case.dtype).eval()
    swapped = milkernels.swap(copy.deepcopy(model))
    assert list(milkernels.swap_report(swapped).replaced) == ["slide_encoder.encoder.layers.0.self_attn"]
    assert_same_run(case, model, swapped, bag(case.dtype, rows=40))


def assert_same_run(case, model, swapped, inputs):
    """``swapped`` (on ``case``'s backend) gives ``model``'s logits and gradients within ``case``'s tolerance,
    each tensor's relative to its largest magnitude (the largest gradient's for the ZERO_GRADIENT ones)."""
    expected, expected_grads = logits_and_grads(model, *inputs)
    with milkernels.use_backend(case.backend):
        logits, grads = logits_and_grads(swapped, *inputs)
    torch.testing.assert_close(logits, expected, **case.tol(expected.abs().max().item()))
    assert grads.keys() == expected_grads.keys()
    largest = max(want.abs().max().item() for want in expected_grads.values())
    for name, want in expected_grads.items():
        scale = largest if name.endswith(ZERO_GRADIENT) else want.abs().max().item()
        assert scale > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(grads[name], want, **case.tol(scale), msg=lambda m: f"{name}: {m}")


def test_gigapath_position_embedding_is_prov_gigapaths_table():
    """Prov-GigaPath adds ``pos_embed[x // 256 * G + y // 256 + 1]`` of MAE's 2D table for a G x G grid (its
    ``np.meshgrid(grid_w, grid_h)``: the first half of row ``i * G + j`` encodes j, the second i)."""
    grid, dim = 7, 16
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    halves = [torch.cat([(p.flatten()[:, None] * omega).sin(), (p.flatten()[:, None] * omega).cos()], dim=1)
              for p in (cols, rows)]
    table = torch.cat(halves, dim=1)
    coords = torch.tensor([[0, 0], [256, 0], [3 * 256 + 17, 5 * 256 + 255], [6 * 256, 2 * 256 + 1]])
    index = coords[:, 0] // 256 * grid + coords[:, 1] // 256
    torch.testing.assert_close(position_embedding(coords, dim), table[index], rtol=0, atol=1e-12)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown zoo model 'clam'.*clam_sb, clam_mb"):
        zoo.build("clam", 1024)
    with pytest.raises(ValueError, match="'abmil' has no layers argument.*lin_mil, gigapath_slide_encoder"):
        zoo.build("abmil", 1024, layers=2)
    with pytest.raises(ValueError, match="layers must be an int >= 1"):
        zoo.build("gigapath_slide_encoder", 1536, layers=0)
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.default_in_dim("clam")


def test_layers_argument_builds_fewer_layers():
    model = zoo.build("gigapath_slide_encoder", 32, layers=2)
    assert len(model.slide_encoder.encoder.layers) == 2
    assert model.profile_layers[-1] == "slide_encoder.encoder.layers.1.ffn"
