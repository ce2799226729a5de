"""Bags of patch features for the profiler: read from CLAM/TRIDENT ``.h5`` files, ``.pt`` files, a
directory of them, or made up with :func:`synthetic_bag`.

``.h5`` (``.hdf5``): dataset ``features`` (N, D) float, optional ``coords`` (N, 2) integer. The
attributes of the file root, of ``features`` and of ``coords`` (TRIDENT keeps ``patch_size_level0``
and friends there) become one dict; a key already taken with another value is prefixed with
``features.`` or ``file.`` (coords' keys stay as they are). The features are read block by block
into the bag's own tensor, so reading holds no second copy.

``.pt`` (``.pth``): a tensor (N, D), or a dict with ``features`` and optional ``coords`` (its
non-tensor entries become the attributes), loaded with ``torch.load(weights_only=True)``,
memory-mapped when the file has the zip format of ``torch.save``.

A bad file raises :class:`BagError` naming the file and the problem.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch
from tqdm import tqdm

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.uint16, torch.uint32, torch.uint64)
READ_BYTES = 64 << 20  # bytes of one h5 read (rounded to whole chunks)
SYNTHETIC_PATCH_SIZE = 256  # pixels at level 0


class BagError(ValueError):
    """A bag file that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class Bag:
    """One slide: ``features`` (N, D) float as stored, ``coords`` (N, 2) int64 patch corners at
    level 0 or None, ``attrs`` the file's attributes, ``source`` the file path or "synthetic".
    Bags compare by identity (tensors have no single truth value)."""

    features: torch.Tensor
    coords: torch.Tensor | None
    attrs: dict
    source: str

    @property
    def n(self) -> int:
        """Number of patches N."""
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """Feature width D."""
        return self.features.shape[1]


def load_bag(path: str | Path, *, progress: bool = True) -> Bag:
    """The bag in the ``.h5`` or ``.pt`` file ``path``: features (N, D), coords (N, 2) or None.
    ``progress`` shows a bar on stderr while an h5 file is read."""
    path = Path(path)
    return reader_for(path)(path, progress)


def bag_paths(path: str | Path) -> list[Path]:
    """``[path]`` for a file; the ``.h5``/``.pt`` files of a directory, sorted by name."""
    path = Path(path)
    if path.is_dir():
        paths = sorted(entry for entry in path.iterdir() if entry.is_file() and entry.suffix.lower() in READERS)
        if not paths:
            raise BagError(f"{path}: the directory holds no {extensions()} files")
        return paths
    if not path.exists():
        raise BagError(f"{path}: no such file or directory")
    return [path]


def iter_bags(path: str | Path, *, progress: bool = True) -> Iterator[Bag]:
    """The bags of :func:`bag_paths` ``(path)``, read one at a time: features (N, D), coords (N, 2)."""
    for bag_path in bag_paths(path):
        yield load_bag(bag_path, progress=progress)


def synthetic_bag(n: int, dim: int, *, seed: int = 0) -> Bag:
    """A random bag: features (n, dim) float32 standard normal, coords (n, 2) int64 on a square grid
    of 256-pixel patches at level 0 (attrs ``patch_size_level0=256``)."""
    check_features("synthetic", (n, dim), torch.float32)
    features = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    side = math.isqrt(n - 1) + 1
    index = torch.arange(n)
    coords = torch.stack((index % side, index // side), dim=1) * SYNTHETIC_PATCH_SIZE
    attrs = {"patch_size": SYNTHETIC_PATCH_SIZE, "patch_size_level0": SYNTHETIC_PATCH_SIZE}
    return Bag(features, coords, attrs, "synthetic")


def read_h5(path: Path, progress: bool) -> Bag:
    """The bag of a CLAM/TRIDENT h5 file: ``features`` (N, D) as stored, ``coords`` (N, 2) int64 when present."""
    try:
        with h5py.File(path, "r") as file:
            features, coords = checked_datasets(path, file)
            reads = [(features, features.dtype.newbyteorder("=")), (coords, np.dtype(np.int64))]
            features_out, coords_out = read_tensors(path.name, reads, progress)
            nodes = [(prefix, node) for prefix, node in (("", coords), ("features.", features), ("file.", file))
                     if node is not None]
            return Bag(features_out, coords_out, merged_attrs(nodes), str(path))
    except OSError as error:
        raise BagError(f"{path}: unreadable HDF5 file ({error})") from error


def checked_datasets(path: Path, file: h5py.File) -> tuple[h5py.Dataset, h5py.Dataset | None]:
    """The ``features`` (N, D) and ``coords`` (N, 2) datasets of ``file`` (coords None if absent),
    checked before anything is read."""
    features = file.get("features")
    if not isinstance(features, h5py.Dataset):
        raise missing_features(path, file.keys())
    check_features(path, features.shape, torch_dtype(features.dtype))
    coords = file.get("coords")
    if not isinstance(coords, h5py.Dataset):
        return features, None
    check_coords(path, coords.shape, torch_dtype(coords.dtype), features.shape[0])
    return features, coords


def read_tensors(name: str, reads: list[tuple[h5py.Dataset | None, np.dtype]], progress: bool) -> list:
    """Each dataset (N, ...) of ``reads`` as a tensor of its dtype (None for a None dataset), with one
    bar on stderr named ``name`` when ``progress``."""
    total = sum(dataset.size * dtype.itemsize for dataset, dtype in reads if dataset is not None)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
              disable=not progress, leave=False) as bar:
        return [None if dataset is None else read_tensor(dataset, dtype, bar) for dataset, dtype in reads]


def read_tensor(dataset: h5py.Dataset, dtype: np.dtype, bar: tqdm) -> torch.Tensor:
    """``dataset`` (N, ...) read block by block into a new tensor of ``dtype`` (h5py converts). The
    buffer is numpy's, as in h5py's own reads: it gets huge pages where the kernel offers them
    (torch.empty's 4 KiB pages made a 400 MB read about 1.8x slower)."""
    array = np.empty(dataset.shape, dtype)
    step = rows_per_read(dataset)
    for start in range(0, len(array), step):
        rows = np.s_[start:start + step]
        dataset.read_direct(array, source_sel=rows, dest_sel=rows)
        bar.update(array[rows].nbytes)
    return torch.from_numpy(array)


def rows_per_read(dataset: h5py.Dataset) -> int:
    """Rows of ``dataset`` in one read: about READ_BYTES, a whole number of chunks if chunked."""
    row_bytes = dataset.dtype.itemsize * math.prod(dataset.shape[1:])
    rows = max(1, READ_BYTES // row_bytes)
    if dataset.chunks is None:
        return rows
    chunk_rows = dataset.chunks[0]
    return max(1, rows // chunk_rows) * chunk_rows


def merged_attrs(nodes: list[tuple[str, h5py.HLObject]]) -> dict:
    """The attributes of ``nodes`` ((prefix, h5 object) pairs) in one dict of plain values. A key
    goes in bare unless an earlier node holds it with another value; then it takes the prefix."""
    attrs = {}
    for prefix, node in nodes:
        for key, value in node.attrs.items():
            value = plain(value)
            attrs[key if attrs.get(key, value) == value else prefix + key] = value
    return attrs


def plain(value: object) -> object:
    """An h5 attribute value as Python: numbers, str (bytes decoded), lists for arrays."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def read_pt(path: Path, progress: bool) -> Bag:
    """The bag of a ``.pt`` file: a tensor (N, D), or a dict with ``features`` (N, D) and optional
    ``coords`` (N, 2). Loading is memory-mapped, so there is nothing to show progress of."""
    content = load_pt(path)
    if isinstance(content, torch.Tensor):
        content = {"features": content}
    if not isinstance(content, dict):
        raise BagError(f"{path}: holds a {type(content).__name__}, expected a tensor (N, D) "
                       "or a dict with 'features'")
    if "features" not in content:
        raise missing_features(path, content.keys())
    features = tensor_entry(path, content, "features")
    check_features(path, features.shape, features.dtype)
    coords = tensor_entry(path, content, "coords")
    if coords is not None:
        check_coords(path, coords.shape, coords.dtype, features.shape[0])
        coords = coords.to(torch.int64)
    attrs = {key: value for key, value in content.items() if not isinstance(value, torch.Tensor)}
    return Bag(features, coords, attrs, str(path))


def load_pt(path: Path):
    """``torch.load`` of ``path`` on the CPU, tensors only, memory-mapped for zip-format files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch.load raises OSError, EOFError, RuntimeError, UnpicklingError...
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BagError(f"{path}: unreadable by torch.load(weights_only=True) ({first_line})") from error


def tensor_entry(path: Path, content: dict, key: str) -> torch.Tensor | None:
    """``content[key]``, which must be a tensor; None when the key is absent."""
    value = content.get(key)
    if value is not None and not isinstance(value, torch.Tensor):
        raise BagError(f"{path}: '{key}' is a {type(value).__name__}, not a tensor")
    return value


READERS: dict[str, Callable[[Path, bool], Bag]] = {
    ".h5": read_h5, ".hdf5": read_h5, ".pt": read_pt, ".pth": read_pt}


def extensions() -> str:
    """The bag file extensions, for messages."""
    return ", ".join(READERS)


def reader_for(path: Path) -> Callable[[Path, bool], Bag]:
    """The reader of ``path``'s extension."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise BagError(f"{path}: unknown extension '{path.suffix}', expected one of {extensions()}")
    return reader


def torch_dtype(dtype: np.dtype) -> torch.dtype | np.dtype:
    """The torch dtype of the numpy ``dtype`` (any byte order); ``dtype`` itself where torch has none."""
    try:
        return torch.from_numpy(np.empty(0, dtype.newbyteorder("="))).dtype
    except TypeError:
        return dtype


def check_features(source: str | Path, shape: tuple[int, ...], dtype: torch.dtype | np.dtype) -> None:
    """Raises BagError unless the features are (N, D) with N, D >= 1 and of a float dtype."""
    if len(shape) != 2:
        raise BagError(f"{source}: features must have rank 2 (N, D), got shape {tuple(shape)}")
    if min(shape) < 1:
        raise BagError(f"{source}: empty bag, features have shape {tuple(shape)}")
    if dtype not in FLOAT_DTYPES:
        raise BagError(f"{source}: features dtype {dtype} is not float16, bfloat16, float32 or float64")


def check_coords(source: str | Path, shape: tuple[int, ...], dtype: torch.dtype | np.dtype, n: int) -> None:
    """Raises BagError unless the coords are (n, 2) of an integer dtype."""
    if tuple(shape) != (n, 2):
        raise BagError(f"{source}: coords must have shape (N, 2) = ({n}, 2), got {tuple(shape)}")
    if dtype not in INTEGER_DTYPES:
        raise BagError(f"{source}: coords dtype {dtype} is not an integer type")


def missing_features(path: Path, keys) -> BagError:
    """The error for a file without a ``features`` entry, listing the keys it has."""
    return BagError(f"{path}: no 'features' dataset or entry (keys found: {sorted(map(str, keys))})")
