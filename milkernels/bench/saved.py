"""Bytes that autograd saves for backward, counted exactly on any device.

A tensor saved for backward is seen by ``torch.autograd.graph.saved_tensors_hooks``' pack hook; the
memory it holds is its storage, so the count is over unique storages (two views of one buffer count
once), less the storages of tensors that exist anyway (the inputs and the parameters). The count works
on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``) too, where nothing is computed: a
100k-patch bag is counted in milliseconds and in no memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def storage_key(tensor: torch.Tensor) -> int:
    """An id of ``tensor``'s storage, the same for every view of it (real or fake)."""
    return tensor.untyped_storage()._cdata


class SavedTensors:
    """Context manager recording every storage that autograd saves for backward inside it.

    ``owner()`` is called at each save and names who saved it (e.g. the layer running); a storage
    belongs to its first saver. Storages of ``exclude`` (inputs, parameters) are not counted.

        with SavedTensors(exclude=[x, *model.parameters()]) as saved:
            loss = model(x).sum()
        saved.total_bytes()
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), owner: Callable[[], str] = lambda: ""):
        self.excluded = {storage_key(t) for t in exclude}
        self.owner = owner
        self.storages: dict[int, tuple[str, int]] = {}  # key -> (owner, bytes)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self.excluded and key not in self.storages:
            self.storages[key] = (self.owner(), tensor.untyped_storage().nbytes())
        return tensor

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def total_bytes(self) -> int:
        """Bytes of all the storages saved, excluded ones left out."""
        return sum(nbytes for _, nbytes in self.storages.values())

    def bytes_by_owner(self) -> dict[str, int]:
        """Bytes saved per owner."""
        totals: dict[str, int] = {}
        for owner, nbytes in self.storages.values():
            totals[owner] = totals.get(owner, 0) + nbytes
        return totals


def saved_bytes(fn: Callable, *inputs, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes that ``fn(*inputs)`` saves for backward, less the storages of the tensors in ``inputs`` and
    of ``exclude`` (pass the parameters of a module ``fn`` calls). The outputs are dropped."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    with SavedTensors(exclude=[*tensors, *exclude]) as saved:
        fn(*inputs)
    return saved.total_bytes()
