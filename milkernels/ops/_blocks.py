"""Launch planning shared by the Triton ops: blocks of rows that never cross a bag, output buffers, dot settings.

Plain Python and torch (no Triton import), so the package imports without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockTable:
    """Blocks of at most BLOCK_N rows, none crossing a bag: ``start``, ``end``, ``bag`` per block
    and ``bag_first_block: (B + 1,)``, int32 on the device; ``host_start``, ``host_end`` on the CPU."""

    start: torch.Tensor
    end: torch.Tensor
    bag: torch.Tensor
    bag_first_block: torch.Tensor
    host_start: torch.Tensor
    host_end: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.host_start.numel()


def block_table(bounds, block_n: int, device) -> BlockTable:
    """The blocks of packed bags with boundaries ``bounds`` (B + 1 ints), planned on the host and copied to
    ``device`` by :func:`to_device` (no stream synchronization)."""
    bounds = torch.tensor(bounds, dtype=torch.long)
    lengths = bounds[1:] - bounds[:-1]
    counts = (lengths + block_n - 1) // block_n
    bag = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    first = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    start = bounds[bag] + (torch.arange(int(first[-1])) - first[bag]) * block_n
    end = torch.minimum(start + block_n, bounds[bag + 1])
    return BlockTable(*to_device([start, end, bag, first], device), start, end)


ALIGNED_ENTRIES = 4  # int32 entries in 16 bytes: the pointer alignment a Triton launch specializes on


def to_device(host_tensors, device) -> list[torch.Tensor]:
    """int32 copies on ``device`` of the 1-D CPU ``host_tensors``, in one transfer, each starting 16 bytes
    aligned. On CUDA the transfer is from pinned memory and non-blocking: a copy from pageable memory
    synchronizes the stream (it waits for every launch queued before it). ValueError for an entry past int32."""
    limits = torch.iinfo(torch.int32)
    if any(tensor.numel() and not limits.min <= int(tensor.min()) <= int(tensor.max()) <= limits.max
           for tensor in host_tensors):
        raise ValueError(f"a launch table entry is past int32 ({limits.min} to {limits.max}): too many rows")
    sizes = [tensor.numel() for tensor in host_tensors]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // ALIGNED_ENTRIES) * ALIGNED_ENTRIES)
    flat = torch.zeros(starts[-1], dtype=torch.int32)
    for tensor, start, size in zip(host_tensors, starts, sizes):
        flat[start:start + size] = tensor
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return [flat[start:start + size] for start, size in zip(starts, sizes)]


def split_rows(total_rows: int, programs_per_split: int, block_n: int, target_programs: int,
               min_split_blocks: int) -> int:
    """Rows per split of a kernel whose programs each loop over a split's whole blocks of ``block_n`` rows:
    at least ``min_split_blocks`` blocks, and enough that ``total_rows`` take about ``target_programs``
    programs of ``programs_per_split`` a split (more only for bags shorter than a split). The splits' partials
    then do not grow with N."""
    wanted_splits = max(1, target_programs // programs_per_split)
    return block_n * max(min_split_blocks, -(-total_rows // (wanted_splits * block_n)))


def new_buffer(*shape, dtype, device):
    """An uninitialized output buffer. Tests replace it with a NaN-filled one to catch unwritten entries."""
    return torch.empty(*shape, dtype=dtype, device=device)


def dot_flags(dtype, interpreted: bool) -> dict:
    """How the kernels run ``tl.dot``: fp32 operands for fp32 input and under the interpreter (whose bf16
    dot is wrong), with tf32x3 on a GPU (tensor cores at about fp32 accuracy); else native fp16/bf16."""
    return dict(DOT_FP32=dtype == torch.float32 or interpreted, FP32_PRECISION="ieee" if interpreted else "tf32x3")


def atomic_dq(dtype: torch.dtype) -> bool:
    """Whether a flash backward on inputs of ``dtype`` adds ``dq`` atomically inside its dk/dv kernel (five products
    a tile pair; float additions in an order that varies between runs) rather than in a query kernel of its own
    (seven, deterministic): in fp16 and bf16, unless ``torch.use_deterministic_algorithms`` is on. fp32 keeps the
    separate kernel: its three tf32 products per dot leave no registers for the extra product (trial sm_90 compiles
    of the fused kernels spilled where the separate ones do not)."""
    return dtype != torch.float32 and not torch.are_deterministic_algorithms_enabled()
