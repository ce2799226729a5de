"""Bag loaders of the profiler (milkernels.bench.bags): h5, pt, directories, synthetic bags, bad files."""

import h5py
import numpy as np
import pytest
import torch

from milkernels.bench import bags
from milkernels.bench.bags import BagError, bag_paths, iter_bags, load_bag, synthetic_bag

TRIDENT_COORDS_ATTRS = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "name": "slide_1"}


def write_h5(path, features, coords=None, coords_attrs=None):
    """An h5 bag at ``path``: features (N, D), coords (N, 2) with ``coords_attrs``."""
    with h5py.File(path, "w") as file:
        file["features"] = features
        if coords is not None:
            file["coords"] = coords
            file["coords"].attrs.update(coords_attrs or {})
    return path


def grid_coords(n):
    """(n, 2) int32 coords of a 10-wide grid of 256-pixel patches."""
    index = np.arange(n)
    return np.stack((index % 10, index // 10), axis=1).astype(np.int32) * 256


def test_h5_with_trident_attrs(tmp_path):
    features = np.random.default_rng(0).standard_normal((37, 8), dtype=np.float32)
    path = write_h5(tmp_path / "slide_1.h5", features, grid_coords(37), TRIDENT_COORDS_ATTRS)
    with h5py.File(path, "a") as file:
        file.attrs["name"] = "a root name"  # clashes with coords' name
        file["features"].attrs["encoder"] = "uni_v1"
    bag = load_bag(path, progress=False)
    assert torch.equal(bag.features, torch.from_numpy(features))
    assert bag.coords.dtype == torch.int64
    assert torch.equal(bag.coords, torch.from_numpy(grid_coords(37)).long())
    assert bag.attrs == {**TRIDENT_COORDS_ATTRS, "encoder": "uni_v1", "file.name": "a root name"}
    assert all(type(value) in (int, str) for value in bag.attrs.values())
    assert (bag.n, bag.dim, bag.source) == (37, 8, str(path))


def test_h5_without_coords_keeps_dtype(tmp_path):
    features = np.arange(12, dtype=np.float16).reshape(4, 3)
    bag = load_bag(write_h5(tmp_path / "bag.h5", features), progress=False)
    assert bag.features.dtype == torch.float16
    assert torch.equal(bag.features, torch.from_numpy(features))
    assert bag.coords is None and bag.attrs == {}


@pytest.mark.parametrize("chunks", [None, (64, 5)])
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8"])
def test_h5_chunked_read_is_exact(tmp_path, monkeypatch, chunks, dtype):
    n = 1001  # not a multiple of the 64-row chunks nor of the rows per read
    monkeypatch.setattr(bags, "READ_BYTES", 3 * 64 * 5 * 4)
    features = np.random.default_rng(1).standard_normal((n, 5)).astype(dtype)
    path = tmp_path / "bag.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("features", data=features, chunks=chunks)
        file.create_dataset("coords", data=grid_coords(n).astype(">i8"), chunks=chunks and (64, 2))
    bag = load_bag(path, progress=False)
    assert torch.equal(bag.features, torch.from_numpy(features.astype(features.dtype.newbyteorder("="))))
    assert torch.equal(bag.coords, torch.from_numpy(grid_coords(n)).long())


def test_progress_bar_on_stderr_and_off(tmp_path, capsys):
    path = write_h5(tmp_path / "slide_7.h5", np.ones((5, 2), np.float32))
    load_bag(path, progress=False)
    assert capsys.readouterr().err == ""
    load_bag(path)
    assert "slide_7.h5" in capsys.readouterr().err


def test_pt_tensor_zip_and_legacy(tmp_path):
    features = torch.randn(6, 4)
    torch.save(features, tmp_path / "zip.pt")
    torch.save(features, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        bag = load_bag(tmp_path / name)
        assert torch.equal(bag.features, features)
        assert bag.coords is None and bag.attrs == {}


def test_pt_dict(tmp_path):
    features = torch.randn(6, 4).bfloat16()
    coords = torch.from_numpy(grid_coords(6))
    torch.save({"features": features, "coords": coords, "patch_size_level0": 512, "labels": torch.zeros(1)},
               tmp_path / "bag.pt")
    bag = load_bag(tmp_path / "bag.pt")
    assert bag.features.dtype == torch.bfloat16 and torch.equal(bag.features, features)
    assert bag.coords.dtype == torch.int64 and torch.equal(bag.coords, coords.long())
    assert bag.attrs == {"patch_size_level0": 512}


def test_directory(tmp_path):
    write_h5(tmp_path / "b.h5", np.full((3, 2), 2, np.float32))
    write_h5(tmp_path / "a.h5", np.full((2, 2), 1, np.float32))
    torch.save(torch.full((4, 2), 3.0), tmp_path / "c.pt")
    (tmp_path / "notes.txt").write_text("not a bag")
    (tmp_path / "sub.h5").mkdir()
    assert bag_paths(tmp_path) == [tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.pt"]
    assert bag_paths(tmp_path / "c.pt") == [tmp_path / "c.pt"]
    assert [bag.n for bag in iter_bags(tmp_path, progress=False)] == [2, 3, 4]


def test_directory_without_bags_and_missing_path(tmp_path):
    (tmp_path / "notes.txt").write_text("not a bag")
    with pytest.raises(BagError, match="holds no .h5"):
        bag_paths(tmp_path)
    with pytest.raises(BagError, match="no such file"):
        bag_paths(tmp_path / "missing.h5")


def test_synthetic_bag():
    bag = synthetic_bag(10, 16, seed=3)
    assert bag.features.shape == (10, 16) and bag.features.dtype == torch.float32
    assert bag.coords.shape == (10, 2) and bag.coords.dtype == torch.int64
    assert len({tuple(xy) for xy in bag.coords.tolist()}) == 10
    assert bag.coords.max() == 3 * 256 and (bag.coords % 256 == 0).all()
    assert bag.attrs["patch_size_level0"] == 256 and bag.source == "synthetic"
    assert torch.equal(bag.features, synthetic_bag(10, 16, seed=3).features)
    assert not torch.equal(bag.features, synthetic_bag(10, 16, seed=4).features)
    with pytest.raises(BagError, match="empty bag"):
        synthetic_bag(0, 16)


def h5_writer(features, coords=None):
    return lambda path: write_h5(path, features, coords)


def write_h5_without_features(path):
    with h5py.File(path, "w") as file:
        file["embeddings"] = np.zeros((2, 2), np.float32)
        file["coords"] = np.zeros((2, 2), np.int32)


def pt_writer(content):
    return lambda path: torch.save(content, path)


def bytes_writer(data):
    return lambda path: path.write_bytes(data)


BAD_FILES = {
    "h5 without features": ("bag.h5", write_h5_without_features, "keys found: ['coords', 'embeddings']"),
    "h5 rank 3": ("bag.h5", h5_writer(np.zeros((1, 4, 3), np.float32)), "rank 2 (N, D), got shape (1, 4, 3)"),
    "h5 empty": ("bag.h5", h5_writer(np.zeros((0, 3), np.float32)), "empty bag"),
    "h5 int features": ("bag.h5", h5_writer(np.zeros((4, 3), np.int32)), "dtype torch.int32 is not float16"),
    "h5 string features": ("bag.h5", h5_writer(np.array([[b"ab"]])), "dtype |S2 is not float16"),
    "h5 coords (N, 3)": ("bag.h5", h5_writer(np.zeros((4, 3), np.float32), np.zeros((4, 3), np.int32)),
                         "coords must have shape (N, 2) = (4, 2), got (4, 3)"),
    "h5 coords other N": ("bag.h5", h5_writer(np.zeros((4, 3), np.float32), np.zeros((5, 2), np.int32)),
                          "coords must have shape (N, 2) = (4, 2), got (5, 2)"),
    "h5 float coords": ("bag.h5", h5_writer(np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32)),
                        "coords dtype torch.float32 is not an integer type"),
    "h5 garbage": ("bag.h5", bytes_writer(b"not an hdf5 file"), "unreadable HDF5 file"),
    "pt without features": ("bag.pt", pt_writer({"feats": torch.zeros(2, 2)}), "keys found: ['feats']"),
    "pt rank 1": ("bag.pt", pt_writer(torch.zeros(5)), "rank 2 (N, D), got shape (5,)"),
    "pt empty": ("bag.pt", pt_writer({"features": torch.zeros(0, 5)}), "empty bag"),
    "pt int features": ("bag.pt", pt_writer(torch.zeros(2, 5, dtype=torch.int64)),
                        "dtype torch.int64 is not float16"),
    "pt features not a tensor": ("bag.pt", pt_writer({"features": [[1.0]]}), "'features' is a list, not a tensor"),
    "pt float coords": ("bag.pt", pt_writer({"features": torch.zeros(2, 5), "coords": torch.zeros(2, 2)}),
                        "coords dtype torch.float32 is not an integer type"),
    "pt list": ("bag.pt", pt_writer([torch.zeros(2, 5)]), "holds a list, expected a tensor"),
    "pt garbage": ("bag.pt", bytes_writer(b"not a torch file"), "unreadable by torch.load"),
    "unknown extension": ("bag.npy", bytes_writer(b""), "unknown extension '.npy'"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_names_file_and_problem(tmp_path, name):
    file_name, write, problem = BAD_FILES[name]
    path = tmp_path / file_name
    write(path)
    with pytest.raises(BagError) as error:
        load_bag(path, progress=False)
    assert str(path) in str(error.value) and problem in str(error.value)

