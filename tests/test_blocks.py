"""Launch planning shared by the Triton ops (``milkernels/ops/_blocks.py``): block tables and their copy to the
device."""

import pytest
import torch

from milkernels.ops import _blocks


def test_to_device_copies_each_tensor_16_bytes_aligned(device):
    """int32 copies on the device, in one buffer, each starting on a 16-byte boundary (a launch specializes on a
    pointer's 16-byte alignment, as the sm_90 compiles assume), for sizes that are no multiple of 4 and empty."""
    tensors = [torch.arange(5), torch.zeros(0, dtype=torch.long), torch.tensor([7, -1, 2**30])]
    copies = _blocks.to_device(tensors, device)
    for tensor, copy in zip(tensors, copies):
        assert copy.dtype == torch.int32 and copy.device.type == device.type
        assert torch.equal(copy.cpu(), tensor.to(torch.int32))
    assert [copy.storage_offset() for copy in copies] == [0, 8, 8]
    assert len({copy.untyped_storage().data_ptr() for copy in copies}) == 1
    assert copies[0].data_ptr() % 16 == 0


def test_to_device_refuses_entries_past_int32():
    """A table entry past int32 (a row index of more than 2**31 - 1 rows) is a ValueError, not a wrapped index."""
    with pytest.raises(ValueError, match="int32"):
        _blocks.to_device([torch.tensor([0, 2**31])], "cpu")


def test_block_table():
    """Blocks of 4 rows over bags of 5, 3 and 8 rows: none crosses a bag."""
    table = _blocks.block_table((0, 5, 8, 16), 4, "cpu")
    assert table.start.tolist() == [0, 4, 5, 8, 12] and table.end.tolist() == [4, 5, 8, 12, 16]
    assert table.bag.tolist() == [0, 0, 1, 2, 2] and table.bag_first_block.tolist() == [0, 2, 3, 5]
    assert table.num_blocks == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_planning_does_not_synchronize_the_stream():
    """A block table reaches the GPU without a stream synchronization (a copy from pageable memory would wait
    for every launch queued before it, once per table and call)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        table = _blocks.block_table((0, 5, 8, 16), 4, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert table.start.tolist() == [0, 4, 5, 8, 12]
