"""milkernels.nn.CrossAttention (CMA-MIL's cross-magnification block), its swap, and the CMA-MIL models of the zoo.

Each fused comparison runs twice: the reference backend in float64 (tight) and the triton backend in float32
(interpreted on the CPU, small bags; 2e-4 relative to the largest magnitude).
"""

import copy

import pytest
import torch
from torch import nn

import milkernels
from milkernels import zoo
from milkernels.nn import CrossAttention, GatedAttention
from milkernels.ops.cross_attention.local import LocalNeighbourhood, neighbour_mask
from milkernels.nn.query_attention import share_state
from milkernels.zoo import cma_mil as zoo_cma_mil
from milkernels.zoo.cma_mil import CMAMIL, coarser_bags, group_means
from test_nn import Case

DIM = 40  # not a power of two
ROWS = [(1, 1), (5, 17), (33, 70)]  # (N_q, N_k)
CASES = [Case("reference", torch.float64), Case("triton", torch.float32, (2e-4, 2e-4))]
# exact gradient 0: softmax is shift invariant (a key bias adds q . b to a whole row; a score bias)
ZERO_GRADIENT = ("key.bias", "attention_c.bias")


@pytest.fixture(params=CASES, ids=lambda c: f"{c.backend}-{str(c.dtype).removeprefix('torch.')}")
def case(request):
    """Each fused-path case, with its backend forced for the test."""
    with milkernels.use_backend(request.param.backend):
        yield request.param


class UpstreamCrossAttention(nn.Module):
    """CMA-MIL's ``CrossAttention`` (``Model/cma-mil.py``) as upstream computes it, the weights formed."""

    def __init__(self, dim):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x1, x2):
        Q, K, V = self.query(x1), self.key(x2), self.value(x2)
        attn_weights = self.softmax(Q @ K.T / (x1.shape[-1] ** 0.5))
        return self.norm(x1 + attn_weights @ V)


class NoResidual(UpstreamCrossAttention):
    """The same children, another forward (no residual): swap must leave it."""

    def forward(self, x1, x2):
        weights = self.softmax(self.query(x1) @ self.key(x2).T / x1.shape[-1] ** 0.5)
        return self.norm(weights @ self.value(x2))


class TwoBlocks(nn.Module):
    """A model holding two upstream blocks, 10x -> 20x and back."""

    def __init__(self):
        super().__init__()
        self.down = UpstreamCrossAttention(DIM)
        self.up = UpstreamCrossAttention(DIM)

    def forward(self, h_10x, h_20x):
        return self.up(h_20x, self.down(h_10x, h_20x))


def upstream_block(dtype=torch.float64, seed=0):
    """An upstream block with a random LayerNorm (so its parameters' gradients say something)."""
    torch.manual_seed(seed)
    block = UpstreamCrossAttention(DIM).to(dtype)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.normal_()
    return block


def bag_pair(rows, dtype, seed=1):
    """``(x1: (N_q, DIM), x2: (N_k, DIM))`` requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, DIM, generator=generator, dtype=dtype).requires_grad_() for n in rows)


def mixed(out):
    """A random mix of the entries of ``out``, a scalar to differentiate."""
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)).sum()


def grads_of(value, module, inputs):
    """``{name: gradient}`` of ``value`` w.r.t. the ``inputs`` (``input0``, ...) and every parameter of ``module``
    (None for those it does not depend on)."""
    named = [*((f"input{i}", x) for i, x in enumerate(inputs)), *module.named_parameters()]
    grads = torch.autograd.grad(value, [tensor for _, tensor in named], allow_unused=True)
    return dict(zip([name for name, _ in named], grads))


def outputs_and_grads(module, inputs, call=None):
    """``(out, grads_of(mixed(out)))`` of ``(call or module)(*inputs)``."""
    out = (call or module)(*inputs)
    return out, grads_of(mixed(out), module, inputs)


def magnitude(tensor) -> float:
    return tensor.abs().max().item() if tensor is not None and tensor.numel() else 0.0


def assert_same(case, got, want):
    """``got`` and ``want`` ``(out, grads)`` agree within ``case``'s tolerance, each tensor relative to its
    largest magnitude; the ZERO_GRADIENT ones (and exact zeros) relative to the largest gradient's."""
    (out, grads), (expected, expected_grads) = got, want
    torch.testing.assert_close(out, expected, **case.tol(magnitude(expected)))
    assert grads.keys() == expected_grads.keys()
    largest = max(map(magnitude, expected_grads.values()))
    for name, expected_grad in expected_grads.items():
        if expected_grad is None:
            assert grads[name] is None, name
            continue
        scale = largest if name.endswith(ZERO_GRADIENT) else magnitude(expected_grad)
        torch.testing.assert_close(grads[name], expected_grad, **case.tol(scale or largest or 1.0),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("rows", ROWS, ids=str)
def test_module_matches_upstream_outputs_and_gradients(case, rows):
    upstream = upstream_block(case.dtype)
    ours = CrossAttention.from_module(upstream)
    inputs = bag_pair(rows, case.dtype)
    assert_same(case, outputs_and_grads(ours, inputs), outputs_and_grads(upstream, inputs))


@pytest.mark.parametrize("rows", [(0, 5), (4, 0), (0, 0)], ids=str)
def test_bags_without_instances_give_upstream_s_result(rows):
    upstream = upstream_block()
    inputs = bag_pair(rows, torch.float64)
    ours, want = outputs_and_grads(CrossAttention.from_module(upstream), inputs), outputs_and_grads(upstream, inputs)
    assert ours[0].shape == (rows[0], DIM)
    assert_same(CASES[0], ours, want)


def ten_x_over_twenty_x() -> LocalNeighbourhood:
    """10x queries over a 6 x 4 grid of 20x keys (each 10x patch holds 2 x 2 of them), radius 0."""
    grid = grid_cells(6, 4)
    return LocalNeighbourhood(torch.unique(grid // 2, dim=0) * 512, grid * 256, 512, 256)


@pytest.mark.parametrize("block", [zoo_cma_mil.CrossAttention, CrossAttention], ids=["zoo", "fused"])
def test_local_mode_attends_to_the_overlapping_patches_only(case, block):
    """Upstream's block with the weights of the non-neighbours set to 0."""
    upstream = upstream_block(case.dtype)
    local = ten_x_over_twenty_x()
    mask = neighbour_mask(local)
    inputs = bag_pair((len(local.coords_q), len(local.coords_k)), case.dtype)

    def masked_upstream(x1, x2):
        scores = upstream.query(x1) @ upstream.key(x2).T / DIM ** 0.5
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return upstream.norm(x1 + weights @ upstream.value(x2))

    ours = share_state(block, upstream)
    assert_same(case, outputs_and_grads(ours, inputs, lambda x1, x2: ours(x1, x2, local=local)),
                outputs_and_grads(upstream, inputs, masked_upstream))


def test_forced_cuda_local_mode_says_why():
    local = ten_x_over_twenty_x()
    x1, x2 = (torch.randn(len(coords), DIM) for coords in (local.coords_q, local.coords_k))
    with milkernels.use_backend("cuda"), pytest.raises(milkernels.BackendUnavailable, match="coordinate-local"):
        CrossAttention(DIM)(x1, x2, local=local)


def test_state_dict_children_and_dropout_argument():
    ours, upstream = CrossAttention(DIM, dropout=0.2), UpstreamCrossAttention(DIM)
    assert list(ours.state_dict()) == list(upstream.state_dict())
    assert [v.shape for v in ours.state_dict().values()] == [v.shape for v in upstream.state_dict().values()]
    assert [(name, repr(child)) for name, child in ours.named_children()] == \
        [(name, repr(child)) for name, child in upstream.named_children()]
    shared = CrossAttention.from_module(upstream)
    assert all(a is b for a, b in zip(shared.parameters(), upstream.parameters()))


def test_batched_input_is_refused():
    with pytest.raises(ValueError, match=r"one bag each, \(N, dim\)"):
        CrossAttention(DIM)(torch.randn(2, 3, DIM), torch.randn(2, 5, DIM))


@pytest.mark.parametrize("widths", [(DIM, DIM - 1), (DIM - 1, DIM), (DIM + 1, DIM + 1)])
def test_dim_mismatch_is_refused(widths):
    with pytest.raises(ValueError, match=f"must both have dim={DIM}"):
        CrossAttention(DIM)(torch.randn(3, widths[0]), torch.randn(5, widths[1]))


def test_local_coords_of_the_wrong_rows_or_shape_are_refused():
    local = ten_x_over_twenty_x()
    x1, x2 = (torch.randn(len(coords), DIM) for coords in (local.coords_q, local.coords_k))
    with pytest.raises(ValueError, match="one row per query and per key"):
        CrossAttention(DIM)(x1[:-1], x2, local=local)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        LocalNeighbourhood(local.coords_q[:, :1], local.coords_k, 512, 256)


def test_swap_replaces_a_bare_block_and_blocks_in_a_model(case):
    upstream = upstream_block(case.dtype)
    swapped = milkernels.swap(upstream)
    assert type(swapped) is CrossAttention and type(upstream) is UpstreamCrossAttention
    assert all(a is b for a, b in zip(swapped.parameters(), upstream.parameters()))
    model = TwoBlocks().to(case.dtype)
    before = copy.deepcopy(model)
    assert milkernels.swap(model) is model
    assert type(model.down) is type(model.up) is CrossAttention
    line = "test_cross_attention_nn.UpstreamCrossAttention -> milkernels.nn.CrossAttention"
    assert milkernels.swap_report(model).fused == {"down": line, "up": line}
    inputs = bag_pair((6, 21), case.dtype)
    assert_same(case, outputs_and_grads(model, inputs), outputs_and_grads(before, inputs))


def hooked(block):
    block.key.register_forward_hook(lambda *args: None)
    return block


def softmax_over_rows(block):
    block.softmax = nn.Softmax(dim=0)
    return block


def wide_query(block):
    block.query = nn.Linear(DIM, 2 * DIM)
    return block


@pytest.mark.parametrize("variant, reason", [
    (lambda: NoResidual(DIM), "forward differs from CMA-MIL's CrossAttention"),
    (lambda: hooked(UpstreamCrossAttention(DIM)), "key has forward hooks"),
    (lambda: softmax_over_rows(UpstreamCrossAttention(DIM)), "softmax is not Softmax(dim=-1)"),
    (lambda: wide_query(UpstreamCrossAttention(DIM)), f"query is not a Linear({DIM}, {DIM})"),
], ids=["other_forward", "hooked", "softmax_dim_0", "wide_query"])
def test_swap_leaves_variants_and_says_why(variant, reason):
    model = nn.Sequential(variant())
    block = model[0]
    assert milkernels.swap(model)[0] is block
    assert reason in milkernels.swap_report(model).skipped["0"]


def grid_cells(width, height):
    """``(width * height, 2)``: the cells ``(x, y)`` of a grid, x-major."""
    return torch.stack(torch.meshgrid(torch.arange(width), torch.arange(height), indexing="ij"), -1).reshape(-1, 2)


def slide(dtype, in_dim=24):
    """``(h_5x, h_10x, h_20x)`` requiring grad and the coords of a 8 x 6 grid of 20x patches (256 px), its
    10x (512 px) and 5x (1024 px) parents."""
    generator = torch.Generator().manual_seed(3)
    grid = grid_cells(8, 6)
    coords = [torch.unique(grid // factor, dim=0) * 256 * factor for factor in (4, 2, 1)]
    features = tuple(torch.randn(len(c), in_dim, generator=generator, dtype=dtype).requires_grad_() for c in coords)
    return features, tuple(zip(coords, (1024, 512, 256)))


@pytest.mark.parametrize("local", [False, True], ids=["dense", "local"])
@pytest.mark.parametrize("subtyping", [False, True])
def test_cma_mil_swapped_keeps_logits_instance_loss_and_gradients(case, subtyping, local):
    torch.manual_seed(0)
    model = CMAMIL(24, n_classes=3, dim=DIM, subtyping=subtyping).to(case.dtype).eval()
    swapped = milkernels.swap(copy.deepcopy(model))
    blocks = ("cross_attn_5x_10x", "cross_attn_10x_20x", "cross_attn_20x_5x")
    assert all(type(swapped.get_submodule(name)) is CrossAttention for name in blocks)
    assert isinstance(swapped.attention_net, GatedAttention)
    features, coords = slide(case.dtype)
    options = dict(coords=coords if local else None, label=torch.tensor([1]))

    def run(candidate):
        logits, loss = candidate(*features, **options)
        return torch.cat([logits.flatten(), loss[None]]), grads_of(mixed(logits) + loss, candidate, features)

    assert_same(case, run(swapped), run(model))


@pytest.mark.parametrize("change, message", [
    (lambda coords: coords[:2], "three \\(coords, patch_size\\) pairs"),
    (lambda coords: (coords[0], None, coords[2]), "coords for 10x missing"),
    (lambda coords: (coords[0], (coords[1][0],), coords[2]), "coords for 10x missing"),
    (lambda coords: (coords[0], coords[1], (coords[2][0][:-1], 256)), "coords for 20x must be \\(48, 2\\)"),
    (lambda coords: ((coords[0][0][:, :1], 1024), coords[1], coords[2]), "coords for 5x must be \\(4, 2\\)"),
])
def test_cma_mil_refuses_bad_coords(change, message):
    features, coords = slide(torch.float32)
    with pytest.raises(ValueError, match=message):
        CMAMIL(24, dim=DIM)(*features, coords=change(coords))


def test_cma_mil_without_label_returns_the_logits_and_takes_its_readme_dims():
    model = CMAMIL()
    features = [torch.randn(n, 512) for n in (2, 5, 20)]
    assert model(*features).shape == (1, 2)
    assert [model.get_submodule(f"adaptor_{m}")[0].weight.shape for m in ("5x", "10x", "20x")] == [(128, 512)] * 3
    assert model.attention_net.attention_c.in_features == 64


def sorted_rows(x):
    return x[torch.argsort(x[:, 0] * 1e6 + x[:, 1])]


def test_coarser_bags_of_a_full_grid_are_its_parent_patches():
    """An 8 x 12 grid of 20x patches in shuffled rows, each patch's features its own coords: the 10x and 5x bags
    are the centres of the 2 x 2 and 4 x 4 blocks (what ``coords // 512`` and ``// 1024`` group)."""
    coords = (grid_cells(8, 12) * 256)[torch.randperm(96, generator=torch.Generator().manual_seed(0))]
    h_5x, h_10x = coarser_bags(coords.double(), coords)
    for bag, size in ((h_10x, 512), (h_5x, 1024)):
        parents, group = torch.unique(coords // size, dim=0, return_inverse=True)
        centres = torch.zeros(len(parents), 2, dtype=torch.float64).index_add(0, group, coords.double()) / \
            torch.bincount(group)[:, None]
        torch.testing.assert_close(sorted_rows(bag), sorted_rows(centres))


def test_coarser_coords_of_a_full_grid_are_the_parent_patches():
    """On a shuffled 8 x 12 grid of 20x patches offset from 0, each group's coords are its parent patch's
    corner, and the local zoo model's blocks see exactly the parent/child relations."""
    coords = (grid_cells(8, 12) * 256 + 1000)[torch.randperm(96, generator=torch.Generator().manual_seed(1))]
    (c_5x, size_5x), (c_10x, size_10x), (c_20x, size_20x) = zoo_cma_mil.coarser_coords(coords)
    assert (size_5x, size_10x, size_20x) == (1024, 512, 256) and c_20x is coords
    for parents, size in ((c_10x, 512), (c_5x, 1024)):
        assert torch.equal(sorted_rows(parents), sorted_rows(torch.unique((coords - 1000) // size, dim=0) * size + 1000))
    child_of = neighbour_mask(LocalNeighbourhood(coords, c_10x, 256, 512))
    assert (child_of.sum(1) == 1).all() and (child_of.sum(0) == 4).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zoo_local_cma_mil_runs_its_blocks_locally(backend):
    torch.manual_seed(0)
    model = zoo.build("cma_mil_local", 16).eval()
    assert zoo.default_in_dim("cma_mil_local") == 512
    features, coords = torch.randn(96, 16), grid_cells(8, 12) * 256
    dense = zoo.build("cma_mil", 16).eval()
    dense.load_state_dict(model.state_dict())
    swapped = milkernels.swap(copy.deepcopy(model))
    with milkernels.use_backend(backend):
        logits = swapped(features, coords)
    torch.testing.assert_close(logits, model(features, coords), rtol=2e-4, atol=2e-4)
    assert not torch.allclose(logits, dense(features, coords))


def test_group_means_take_consecutive_rows_and_a_short_last_group():
    x = torch.arange(10.0)[:, None]
    torch.testing.assert_close(group_means(x, 4), torch.tensor([[1.5], [5.5], [8.5]]))
    assert [bag.shape for bag in coarser_bags(torch.randn(37, 3), None)] == [(3, 3), (10, 3)]
    assert [bag.shape for bag in coarser_bags(torch.randn(0, 3), None)] == [(0, 3), (0, 3)]


def test_zoo_cma_mil_runs_and_its_profile_layers_resolve():
    torch.manual_seed(0)
    model = zoo.build("cma_mil", 32, n_classes=3).eval()
    assert zoo.default_in_dim("cma_mil") == 512
    features = torch.randn(70, 32, requires_grad=True)
    coords = torch.randint(0, 30, (70, 2)) * 256
    for where in (coords, None):
        logits = model(features, where)
        assert logits.shape == (1, 3) and logits.isfinite().all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    swapped = milkernels.swap(copy.deepcopy(model))
    assert [type(swapped.get_submodule(name)) for name in model.profile_layers] == [nn.Sequential] * 3 + \
        [CrossAttention] * 3 + [GatedAttention]
    torch.testing.assert_close(swapped(features, coords), model(features, coords))
