"""Swapped zoo models train under DistributedDataParallel and FSDP2 (``fully_shard``) like the same models
unswapped: 2 gloo ranks, each with its own bags, a few SGD steps, then every parameter compared.

The models run in eval mode, which trains all the same but draws no dropout mask: the fused ops draw theirs
with another generator, so they could not match."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import milkernels
from milkernels import zoo
from milkernels.zoo.gigapath import GigaPath, LongNetArgs
from sharding import assert_close, device, run_ranks

IN_DIM = 32
MODELS = {
    "clam_sb": lambda: zoo.build("clam_sb", IN_DIM),
    "litemil": lambda: zoo.build("litemil", IN_DIM),
    "lin_mil": lambda: zoo.build("lin_mil", IN_DIM, layers=1),
    # GigaPath's head size (48) and two of its branches, at segment lengths that split bags of 30 rows
    "gigapath": lambda: GigaPath(IN_DIM, layers=1, dim=96, heads=2, args=LongNetArgs([16, 32], [1, 2])),
}
STEPS = 3


def _wrap(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh(device().type, (dist.get_world_size(),)))


def _full(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter as one tensor (FSDP2 holds a shard of each, as a DTensor)."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def check_trains_like_unswapped(rank: int, world_size: int, name: str, wrapper: str, backend: str) -> None:
    torch.manual_seed(0)
    plain = MODELS[name]().to(device()).eval()  # no dropout: the draws differ
    fused = milkernels.swap(copy.deepcopy(plain))
    report = milkernels.swap_report(fused)
    assert report.fused or report.replaced, f"nothing of {name} was swapped"
    models = {"plain": _wrap(plain, wrapper), "fused": _wrap(fused, wrapper)}
    optimizers = {key: torch.optim.SGD(model.parameters(), lr=0.05) for key, model in models.items()}
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 * step + rank)
        bag = torch.randn(29 + 7 * rank, IN_DIM, generator=generator).to(device())
        label = torch.randint(0, 2, (1,), generator=generator).to(device())
        for key, model in models.items():
            with milkernels.use_backend(backend if key == "fused" else "reference"):
                F.cross_entropy(model(bag), label).backward()
            optimizers[key].step()
            optimizers[key].zero_grad()
    pairs = zip(models["plain"].named_parameters(), models["fused"].named_parameters())
    for (key, want), (_, got) in pairs:
        assert_close(_full(got.detach()), _full(want.detach()), f"rank {rank}, {name}, {wrapper}: {key}",
                     rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("wrapper", ("ddp", "fsdp2"))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_swapped_model_trains_like_unswapped(name, wrapper):
    run_ranks(2, check_trains_like_unswapped, name, wrapper, "triton")
