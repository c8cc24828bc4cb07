"""Datasets: IDX and CIFAR readers on files written here, search order, splits, loader order."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcomp.apps import data
from gradcomp.apps.data import (
    DatasetNotFoundError,
    TensorSplit,
    list_datasets,
    load_dataset,
    make_loader,
    read_idx,
)

FMNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    # Keep the caller's $GRADCOMP_DATA and the real Debian files out unless a test opts in.
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_ROOT", tmp_path / "no-debian")


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.tobytes()


def _write_idx_set(d: Path, n_train: int, n_test: int, seed: int, gz: bool) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    d.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            with gzip.open(d / f"{stem}.gz", "wb") as f:
                f.write(raw)
        else:
            (d / stem).write_bytes(raw)
    return arrays


def _unnormalise(split: TensorSplit, ds) -> np.ndarray:
    """Back to the raw 0..255 pixels: x_raw = 255 * (x * std + mean)."""
    mean = torch.tensor(ds.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float64).view(1, -1, 1, 1)
    return (255.0 * (split.x.to(torch.float64) * std + mean)).numpy()


# ------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_exact(tmp_path, gz):
    arrays = _write_idx_set(tmp_path, 50, 20, seed=1, gz=gz)
    suffix = ".gz" if gz else ""
    for stem, arr in arrays.items():
        got = read_idx(tmp_path / f"{stem}{suffix}")
        assert got.dtype == arr.dtype and np.array_equal(got, arr)


def test_idx_int32_big_endian(tmp_path):
    arr = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    got = read_idx(tmp_path / "a")
    assert got.shape == (2, 3) and np.array_equal(got, arr.astype(np.int32))


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x00\x01\x08\x01" + struct.pack(">I", 2) + b"ab", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab", "not an IDX file"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 2), "header truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"ab", "size mismatch"),
    ],
)
def test_idx_bad_file_raises_naming_it(tmp_path, payload, match):
    p = tmp_path / "bad-idx"
    p.write_bytes(payload)
    with pytest.raises(ValueError, match=match) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_idx_corrupt_gzip(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ValueError, match="cannot read IDX"):
        read_idx(p)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loads_exact_pixels_and_labels(tmp_path, gz):
    arrays = _write_idx_set(tmp_path / "mnist", 60, 30, seed=2, gz=gz)
    ds = load_dataset("mnist", tmp_path, val_fraction=0.0)  # found in the named subfolder
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)
    assert len(ds.val) == 0 and len(ds.train) == 60
    # Test split keeps file order: pixels back exactly (float32 affine map, error << 0.5).
    test_px = _unnormalise(ds.test, ds)
    assert np.array_equal(np.rint(test_px[:, 0]).astype(np.uint8), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(ds.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    # Train split is a permutation of the file: match each image to its label via sorting keys.
    tr = np.rint(_unnormalise(ds.train, ds)[:, 0]).astype(np.uint8).reshape(60, -1)
    ref = arrays["train-images-idx3-ubyte"].reshape(60, -1)
    pos = {row.tobytes(): i for i, row in enumerate(ref)}
    idx = np.array([pos[row.tobytes()] for row in tr])
    assert sorted(idx.tolist()) == list(range(60))
    assert np.array_equal(ds.train.y.numpy(), arrays["train-labels-idx1-ubyte"][idx])


def test_search_order(tmp_path, monkeypatch):
    a = _write_idx_set(tmp_path / "arg", 10, 5, seed=3, gz=True)
    e = _write_idx_set(tmp_path / "env" / "fashion-mnist", 12, 5, seed=4, gz=False)
    deb = _write_idx_set(tmp_path / "deb" / "fashion-mnist", 14, 5, seed=5, gz=True)
    monkeypatch.setattr(data, "DEBIAN_ROOT", tmp_path / "deb")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))

    def labels(**kw):
        return load_dataset("fashion-mnist", val_fraction=0.0, **kw).test.y.numpy()

    assert np.array_equal(labels(data_dir=tmp_path / "arg"), a["t10k-labels-idx1-ubyte"])
    # without data_dir: $GRADCOMP_DATA/<name>, then Debian
    assert np.array_equal(labels(), e["t10k-labels-idx1-ubyte"])
    monkeypatch.delenv(data.ENV_VAR)
    assert np.array_equal(labels(), deb["t10k-labels-idx1-ubyte"])


def test_given_data_dir_is_used_or_refused(tmp_path, monkeypatch):
    # a data_dir the user gave is never silently replaced by another copy of the dataset
    _write_idx_set(tmp_path / "env" / "fashion-mnist", 12, 5, seed=4, gz=False)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "empty")) as e:
        load_dataset("fashion-mnist", tmp_path / "empty")
    assert str(tmp_path / "env") not in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="--data-dir .*nope does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nope")
    with pytest.raises(ValueError, match="built in and reads no files"):
        load_dataset("digits", tmp_path / "empty")


def test_missing_cifar_names_where_it_looked(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(DatasetNotFoundError, match="no --data-dir given, .GRADCOMP_DATA is unset"):
        load_dataset("cifar10")


def test_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert "\n" not in msg
    assert isinstance(e.value, FileNotFoundError)
    for d in (
        tmp_path / "env",
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "no-debian" / "fashion-mnist",
    ):
        assert str(d) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    # An incomplete set (one file missing) does not count as found.
    _write_idx_set(tmp_path / "arg", 5, 5, seed=0, gz=True)
    (tmp_path / "arg" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion-mnist", tmp_path / "arg")
    with pytest.raises(DatasetNotFoundError, match="cifar10"):
        load_dataset("cifar10", tmp_path)


def test_unknown_names_and_options():
    names = ["fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "synthetic",
             "shakespeare", "shakespeare-works"]
    assert list_datasets() == names
    with pytest.raises(ValueError, match="valid datasets: fashion-mnist, mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown option.*colour.*allowed: num_train"):
        load_dataset("synthetic", colour=True)
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("synthetic", val_fraction=1.0)
    with pytest.raises(ValueError, match="max_train"):
        load_dataset("synthetic", max_train=0)
    with pytest.raises(ValueError, match="label_mode"):
        load_dataset("cifar100", label_mode="medium")


# ------------------------------------------------------------------------------------ CIFAR


def _cifar_batch(rng, n, label_keys, py2_keys):
    d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    for k, hi in label_keys:
        d[k] = rng.integers(0, hi, n).tolist()  # the real files store labels as a Python list
    return {k.encode(): v for k, v in d.items()} if py2_keys else d


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar10_roundtrip_exact(tmp_path, sub):
    rng = np.random.default_rng(6)
    d = tmp_path / sub
    d.mkdir(exist_ok=True)
    batches = [_cifar_batch(rng, 8, [("labels", 10)], py2_keys=True) for _ in range(6)]
    for i, b in enumerate(batches[:5]):
        _dump(b, d / f"data_batch_{i + 1}")
    _dump(batches[5], d / "test_batch")
    _dump({b"label_names": [b"airplane"] * 10}, d / "batches.meta")
    ds = load_dataset("cifar10", tmp_path, val_fraction=0.25)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 8)
    px = np.rint(_unnormalise(ds.test, ds)).astype(np.uint8)
    # Row layout: 1024 R, 1024 G, 1024 B, each 32x32 row-major.
    assert np.array_equal(px, batches[5][b"data"].reshape(8, 3, 32, 32))
    assert ds.test.y.tolist() == batches[5][b"labels"]
    assert sorted(ds.train.y.tolist() + ds.val.y.tolist()) == sorted(
        sum((b[b"labels"] for b in batches[:5]), [])
    )


@pytest.mark.parametrize("mode, classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_roundtrip_exact(tmp_path, mode, classes):
    rng = np.random.default_rng(7)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    keys = [("fine_labels", 100), ("coarse_labels", 20)]
    train, test = (_cifar_batch(rng, n, keys, py2_keys=False) for n in (12, 6))
    _dump(train, d / "train")
    _dump(test, d / "test")
    ds = load_dataset("cifar100", tmp_path, val_fraction=0.0, label_mode=mode)
    assert ds.num_classes == classes and len(ds.train) == 12
    assert ds.test.y.tolist() == test[f"{mode}_labels"]
    px = np.rint(_unnormalise(ds.test, ds)).astype(np.uint8)
    assert np.array_equal(px, test["data"].reshape(6, 3, 32, 32))


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for i in range(1, 6):
        _dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, tmp_path / f"data_batch_{i}")
    _dump({"data": Evil(), "labels": [0]}, tmp_path / "test_batch")
    with pytest.raises(ValueError, match="refusing global builtins.print"):
        load_dataset("cifar10", tmp_path)


# ------------------------------------------------------------------------------------ splits


def test_splits_deterministic_and_disjoint():
    a = load_dataset("synthetic", split_seed=3, num_train=400)
    b = load_dataset("synthetic", split_seed=3, num_train=400)
    c = load_dataset("synthetic", split_seed=4, num_train=400)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.val.x, c.val.x)
    assert (len(a.train), len(a.val)) == (360, 40)
    # Disjoint and complete: every sample (a distinct continuous-valued image) lands once.
    rows = torch.cat([a.train.x, a.val.x]).flatten(1)
    assert torch.unique(rows, dim=0).shape[0] == 400
    # max_train: a deterministic prefix of the same shuffled order, still disjoint from val.
    m = load_dataset("synthetic", split_seed=3, num_train=400, max_train=100)
    assert len(m.train) == 100 and torch.equal(m.val.y, a.val.y)
    std = torch.tensor(a.std).view(1, -1, 1, 1)
    mean_m = torch.tensor(m.mean).view(1, -1, 1, 1)
    mean_a = torch.tensor(a.mean).view(1, -1, 1, 1)
    std_m = torch.tensor(m.std).view(1, -1, 1, 1)
    raw_m = m.train.x.double() * std_m + mean_m
    raw_a = a.train.x[:100].double() * std + mean_a
    assert torch.allclose(raw_m, raw_a, atol=1e-5)


def test_normalisation_uses_train_statistics():
    ds = load_dataset("synthetic", in_channels=3, num_train=600, separation=2.0)
    x = ds.train.x.double()
    # Exact by construction (float32 rounding only): train is zero-mean, unit-std per channel.
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64))
    # Val uses the train map, so it is only approximately standardised. Its 60 images are a random
    # draw; even if all pixels of an image were fully correlated (the worst case), the mean of 60
    # unit-variance image means has std 1/sqrt(60) = 0.13, so 0.5 is a ~3.9 sigma bound.
    assert ds.val.x.dtype == torch.float32 and ds.val.y.dtype == torch.int64
    assert abs(ds.val.x.double().mean().item()) < 0.5
    # A constant channel normalises to zeros rather than NaN.
    z = data._channel_stats(torch.full((4, 1, 2, 2), 3.0))
    assert z[1].item() == 1.0


def test_digits_shape_and_fixed_test_split():
    a = load_dataset("digits", split_seed=0)
    b = load_dataset("digits", split_seed=1)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.test) == round(0.2 * 1797)
    assert torch.equal(a.test.y, b.test.y)  # the test split does not move with split_seed
    assert not torch.equal(a.val.y, b.val.y)


def test_real_fashion_mnist_package(monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_ROOT", FMNIST_DEBIAN.parent)
    ds = load_dataset("fashion-mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    assert ds.train.x.shape[1:] == (1, 28, 28) and ds.num_classes == 10
    # The published Fashion-MNIST training statistics are mean 0.2860, std 0.3530 over all 60k;
    # our 54k train split is a random subset, whose mean moves by ~0.35/sqrt(54000*784) << 1e-3
    # per pixel but images are correlated, so allow 3e-3.
    assert abs(ds.mean[0] - 0.2860) < 3e-3 and abs(ds.std[0] - 0.3530) < 3e-3
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------ loader


def _split(n=103):
    g = torch.Generator().manual_seed(0)
    return TensorSplit(torch.randn(n, 1, 2, 2, generator=g), torch.arange(n))


def _order(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_loader_order_depends_only_on_seed_and_epoch():
    s = _split()
    a = make_loader(s, 10, shuffle=True, seed=5)
    b = make_loader(s, 10, shuffle=True, seed=5)
    a.set_epoch(3)
    list(make_loader(s, 10, shuffle=True, seed=5))  # other loaders' use does not matter
    torch.manual_seed(123)  # nor does the global RNG
    b.set_epoch(3)
    assert _order(a) == _order(b) == _order(a)  # re-iterating repeats the epoch
    assert sorted(_order(a)) == list(range(103))
    b.set_epoch(4)
    c = make_loader(s, 10, shuffle=True, seed=6)
    c.set_epoch(3)
    assert _order(b) != _order(a) and _order(c) != _order(a)
    # Resume mid-epoch: the remaining batches are exactly the tail of the uninterrupted epoch.
    full = [y.tolist() for _, y in a]
    a.set_epoch(3, start_batch=4)
    assert [y.tolist() for _, y in a] == full[4:]


def test_loader_lengths_and_no_shuffle():
    s = _split()
    assert len(make_loader(s, 10, shuffle=False)) == 11
    dl = make_loader(s, 10, shuffle=False, drop_last=True)
    assert len(dl) == 10 and _order(dl) == list(range(100))
    xb, yb = next(iter(dl))
    assert torch.equal(xb, s.x[:10]) and torch.equal(yb, s.y[:10])
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(s, 0, shuffle=True)
    with pytest.raises(ValueError, match="start_batch"):
        dl.set_epoch(0, start_batch=11)


def test_loader_workers_same_batches():
    s = _split()
    a = make_loader(s, 16, shuffle=True, seed=1)
    w = make_loader(s, 16, shuffle=True, seed=1, workers=2, device="cpu")
    a.set_epoch(2)
    w.set_epoch(2)
    ba, bw = list(a), list(w)
    assert len(ba) == len(bw) == len(a)
    for (xa, ya), (xw, yw) in zip(ba, bw):
        assert torch.equal(xa, xw) and torch.equal(ya, yw)
