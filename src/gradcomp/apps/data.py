"""Datasets by name, deterministic splits and a reproducible batch loader.

Every dataset is read from local files (nothing downloads at run time) and comes back as a
:class:`DatasetSplits` of in-memory float32 NCHW tensors normalised per channel with the mean and
std of the *training* split. Registry::

    fashion-mnist, mnist   IDX files (gzipped or raw), 28x28x1, 10 classes
    cifar10, cifar100      python-pickle batches, 32x32x3, 10 / 100 (fine) or 20 (coarse) classes
    digits                 scikit-learn's bundled 8x8x1 digits, 10 classes (file shipped in sklearn)
    synthetic              seeded Gaussian class blobs shaped as images (tests, quick runs)

Text datasets (byte tokens, :mod:`gradcomp.apps.text`; ``load_dataset`` returns a
:class:`gradcomp.apps.text.TextDataset` for them, option ``context``, default
``DEFAULT_CONTEXT`` = 64 bytes)::

    shakespeare            next-byte language modelling on the Shakespeare corpus (task lm)
    shakespeare-works      which of the 8 longest works a passage comes from (task classify)

Directory search for file-based datasets: a ``data_dir`` the caller gives is the only place
searched (it and its subfolders named after the dataset); it must exist and hold the files, and
is never silently replaced by another copy. Without ``data_dir``: ``$GRADCOMP_DATA`` (same
subfolders), then the Debian package location (``/usr/share/datasets/<name>``), first hit wins.
A missing dataset raises :class:`DatasetNotFoundError` with one line naming every directory
searched and how to get the files. The built-in datasets (digits, synthetic) read no files and
refuse a ``data_dir``.
"""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradcomp.numerics._checks import require_int_range, require_open_unit

__all__ = [
    "BatchLoader",
    "DatasetNotFoundError",
    "DatasetSplits",
    "TensorSplit",
    "TEXT_DATASETS",
    "DEFAULT_CONTEXT",
    "is_text_dataset",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "read_idx",
]

ENV_VAR = "GRADCOMP_DATA"
# text dataset name -> (corpus, task) of gradcomp.apps.text
TEXT_DATASETS = {"shakespeare": ("shakespeare", "lm"),
                 "shakespeare-works": ("shakespeare", "classify")}
DEFAULT_CONTEXT = 64  # bytes per sequence: a few hundred steps of gpt-tiny fit on 2 CPU cores
DEBIAN_ROOT = Path("/usr/share/datasets")
_MAX_INT = 2**62


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched directories (message: one line)."""


@dataclass(frozen=True)
class TensorSplit:
    """One split: ``x`` float32 (N, C, H, W) normalised, ``y`` int64 (N,) class indices."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise ValueError(
                f"x must be float32 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dim() != 1 or self.y.dtype != torch.int64 or len(self.y) != len(self.x):
            raise ValueError(
                f"y must be int64 (N,) with N = {len(self.x)}, "
                f"got {self.y.dtype} {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> TensorSplit:
        """Both tensors on ``device`` (no copy when already there)."""
        return TensorSplit(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded dataset: three disjoint splits and what a model needs to know about them.

    ``mean``/``std`` are the per-channel statistics of the raw training pixels (scaled to [0, 1]
    for image files) that were used to normalise all three splits.
    """

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# A raw dataset before splitting: train and test arrays (N, C, H, W) and labels, class count.
@dataclass
class _Raw:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float  # raw pixel values are divided by this to land in [0, 1]


_REGISTRY: dict[str, Callable[..., _Raw]] = {}


def _register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`: the image datasets in registry order, then the
    text datasets."""
    return list(_REGISTRY) + list(TEXT_DATASETS)


def is_text_dataset(name: str) -> bool:
    """Whether ``name`` is a text dataset (token sequences, :mod:`gradcomp.apps.text`)."""
    return name in TEXT_DATASETS


def _load_text(name: str, data_dir, val_fraction: float, split_seed: int,
               max_train: int | None, opts: dict):
    from gradcomp.apps.text import load_text_dataset  # text imports this module

    unknown = sorted(set(opts) - {"context"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; "
                         "allowed: context")
    corpus, task = TEXT_DATASETS[name]
    context = opts.get("context")
    return load_text_dataset(
        corpus, data_dir, task=task, context=DEFAULT_CONTEXT if context is None else context,
        val_fraction=val_fraction, test_fraction=val_fraction, split_seed=split_seed,
        max_train=max_train,
    )


# ----------------------------------------------------------------------------- directory search


def _candidate_dirs(data_dir, subdirs: Sequence[str], debian: str | None) -> list[Path]:
    """Directories to search, in order: data_dir alone when given (also with ``subdirs``);
    otherwise $GRADCOMP_DATA (also with ``subdirs``), then the Debian package directory."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        return [root, *(root / s for s in subdirs)]
    roots = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    out = []
    for root in roots:
        out.append(root)
        out.extend(root / s for s in subdirs)
    if debian is not None:
        out.append(DEBIAN_ROOT / debian)
    return out


def _not_found(name: str, searched: Sequence[Path], files: str, how: str) -> DatasetNotFoundError:
    dirs = ", ".join(str(p) for p in searched) or (
        f"no directory: no --data-dir given, ${ENV_VAR} is unset and there is no system package "
        f"for {name}")
    return DatasetNotFoundError(f"dataset {name!r} not found: looked for {files} in {dirs}; {how}")


# ----------------------------------------------------------------------------- IDX (MNIST family)

# IDX type byte -> big-endian numpy dtype (the format stores every multi-byte value big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (``.gz`` decompressed on the fly) into a numpy array of its shape.

    Layout: two zero bytes, a type byte, a dimension count d, d big-endian uint32 sizes, then the
    values. Raises ValueError naming the file when the magic, type or size does not match.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise ValueError(f"{path}: cannot read IDX file ({e})") from e
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {buf[:4].hex() or 'missing'}; expected 0000 + "
            f"type in {sorted(hex(k) for k in _IDX_DTYPES)} + ndim)"
        )
    dtype = np.dtype(_IDX_DTYPES[buf[2]])
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(buf)} bytes for {ndim} dims)")
    shape = tuple(int(s) for s in np.frombuffer(buf, ">u4", ndim, 4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: {len(buf)} bytes, header {shape} needs {expected}"
        )
    return np.frombuffer(buf, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find_idx(d: Path) -> list[Path] | None:
    """The four IDX files in ``d`` (raw preferred over .gz), or None if any is missing."""
    found = []
    for stem in _IDX_FILES:
        for cand in (d / stem, d / f"{stem}.gz"):
            if cand.is_file():
                found.append(cand)
                break
        else:
            return None
    return found


def _load_idx_dataset(name: str, data_dir, debian: str | None, how: str) -> _Raw:
    searched = _candidate_dirs(data_dir, (name, name.replace("-", "_")), debian)
    for d in searched:
        files = _find_idx(d)
        if files is None:
            continue
        xtr, ytr, xte, yte = (read_idx(p) for p in files)
        for x, y, p in ((xtr, ytr, files[0]), (xte, yte, files[2])):
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"{p}: images {x.shape} and labels {y.shape} do not pair up")
        return _Raw(xtr[:, None], ytr, xte[:, None], yte, 10, 255.0)
    raise _not_found(name, searched, "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]", how)


@_register("fashion-mnist")
def _fashion_mnist(data_dir=None) -> _Raw:
    return _load_idx_dataset(
        "fashion-mnist",
        data_dir,
        "fashion-mnist",
        "install it with `apt-get install dataset-fashion-mnist` (or `make data`), or put the "
        f"four IDX files in --data-dir / ${ENV_VAR}",
    )


@_register("mnist")
def _mnist(data_dir=None) -> _Raw:
    # Debian packages only Fashion-MNIST (`apt-cache search mnist`), so there is no system location.
    return _load_idx_dataset(
        "mnist",
        data_dir,
        None,
        "copy the four IDX files from yann.lecun.com/exdb/mnist (or a mirror) into --data-dir / "
        f"${ENV_VAR}/mnist",
    )


# ----------------------------------------------------------------------------- CIFAR pickles


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a CIFAR batch needs nothing else, and refusing
    every other global keeps a tampered file from running code."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in a CIFAR batch file")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a CIFAR python batch ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (top level is {type(raw).__name__})")
    # Keys are bytes in the original files (pickled by Python 2), str when re-pickled by Python 3.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be (N, 3072) uint8, got {data.shape}")
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue, each row-major 32x32.
    return data.astype(np.uint8).reshape(-1, 3, 32, 32)


def _cifar_labels(batch: dict, key: str, path: Path, n: int) -> np.ndarray:
    if key not in batch:
        raise ValueError(f"{path}: missing {key!r} (keys: {sorted(batch)})")
    y = np.asarray(batch[key], dtype=np.int64)
    if y.shape != (n,):
        raise ValueError(f"{path}: {key!r} has shape {y.shape}, expected ({n},)")
    return y


_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@_register("cifar10")
def _cifar10(data_dir=None) -> _Raw:
    searched = _candidate_dirs(
        data_dir, ("cifar-10-batches-py", "cifar10", "cifar10/cifar-10-batches-py"), None
    )
    for d in searched:
        if not all((d / f).is_file() for f in _CIFAR10_FILES):
            continue
        xs, ys = [], []
        for f in _CIFAR10_FILES:
            b = _read_cifar_batch(d / f)
            x = _cifar_images(b, d / f)
            xs.append(x)
            ys.append(_cifar_labels(b, "labels", d / f, len(x)))
        return _Raw(np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5], 10, 255.0)
    raise _not_found(
        "cifar10",
        searched,
        "data_batch_1..5 and test_batch",
        "extract cifar-10-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html into --data-dir / "
        f"${ENV_VAR}",
    )


@_register("cifar100")
def _cifar100(data_dir=None, label_mode: str = "fine") -> _Raw:
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be one of 'fine', 'coarse'; got {label_mode!r}")
    searched = _candidate_dirs(
        data_dir, ("cifar-100-python", "cifar100", "cifar100/cifar-100-python"), None
    )
    for d in searched:
        if not ((d / "train").is_file() and (d / "test").is_file()):
            continue
        out = []
        for f in ("train", "test"):
            b = _read_cifar_batch(d / f)
            x = _cifar_images(b, d / f)
            out += [x, _cifar_labels(b, f"{label_mode}_labels", d / f, len(x))]
        return _Raw(*out, 100 if label_mode == "fine" else 20, 255.0)
    raise _not_found(
        "cifar100",
        searched,
        "train and test",
        "extract cifar-100-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html into "
        "--data-dir / "
        f"${ENV_VAR}",
    )


# ----------------------------------------------------------------------------- bundled / synthetic

_BUILT_IN = ("digits", "synthetic")  # datasets that read no files
_DIGITS_TEST_SEED = 20240601  # fixed so the digits test split never depends on split_seed


@_register("digits")
def _digits(data_dir=None, test_fraction: float = 0.2) -> _Raw:
    """scikit-learn's 1797 8x8 digits (values 0..16); the file ships inside sklearn. There is no
    official test split, so a fixed-seed ``test_fraction`` of the samples is held out."""
    require_open_unit(test_fraction, "test_fraction")
    from sklearn.datasets import load_digits  # local: sklearn is only needed for this dataset

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(_DIGITS_TEST_SEED).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return _Raw(x[tr], y[tr], x[te], y[te], 10, 16.0)


@_register("synthetic")
def _synthetic(
    data_dir=None,
    num_train: int = 1024,
    num_test: int = 256,
    num_classes: int = 4,
    in_channels: int = 1,
    image_size: int = 8,
    separation: float = 1.0,
    seed: int = 0,
) -> _Raw:
    """Gaussian class blobs: class k has a mean image m_k ~ N(0, separation^2) per pixel and a
    sample is m_k + N(0, 1) noise. Labels are balanced (i mod num_classes) before shuffling."""
    require_int_range(num_train, "num_train", 2, _MAX_INT)
    require_int_range(num_test, "num_test", 1, _MAX_INT)
    require_int_range(num_classes, "num_classes", 2, 1_000_000)
    require_int_range(in_channels, "in_channels", 1, 4096)
    require_int_range(image_size, "image_size", 1, 4096)
    if not float(separation) >= 0.0:
        raise ValueError(f"separation must be >= 0, got {separation!r}")
    rng = np.random.default_rng(seed)
    shape = (in_channels, image_size, image_size)
    centres = rng.normal(0.0, float(separation), (num_classes, *shape)).astype(np.float32)

    def draw(n):
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        return centres[y] + rng.standard_normal((n, *shape), dtype=np.float32), y

    xtr, ytr = draw(num_train)
    xte, yte = draw(num_test)
    return _Raw(xtr, ytr, xte, yte, num_classes, 1.0)


# ----------------------------------------------------------------------------- splits


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std over (N, H, W), accumulated in float64 so 60k images of
    uint8 pixels do not lose digits; a constant channel gets std 1 (normalising it to zeros)."""
    var, mean = torch.var_mean(x.to(torch.float64), dim=(0, 2, 3), correction=0)
    std = var.sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def load_dataset(
    name: str,
    data_dir=None,
    *,
    val_fraction: float | None = None,
    split_seed: int = 0,
    max_train: int | None = None,
    **opts,
) -> DatasetSplits:
    """Load dataset ``name`` (see :func:`list_datasets`) from local files into normalised splits.

    The official training set is shuffled by a generator seeded with ``split_seed``; the first
    ``round(val_fraction * N)`` samples (at least 1) become ``val``, the rest ``train``; ``test``
    is the official test set (``val_fraction`` None: 0.1). ``val_fraction=0`` gives an empty
    val split. ``max_train`` keeps the
    first ``max_train`` training samples of that shuffled order (a deterministic subset, disjoint
    from val). Pixels are divided by the format's maximum (255, or 16 for digits), then
    every split is normalised per channel with the mean and std of the final ``train`` split.
    ``opts`` are dataset-specific (``cifar100``: ``label_mode``; ``digits``: ``test_fraction``;
    ``synthetic``: ``num_train, num_test, num_classes, in_channels, image_size, separation, seed``);
    an unknown option raises ValueError naming the allowed ones.

    Text datasets (``shakespeare``, ``shakespeare-works``) return a
    :class:`gradcomp.apps.text.TextDataset` of byte-token windows (option ``context``, default
    ``DEFAULT_CONTEXT``); ``val_fraction`` is then the fraction of each work's chunks in val and
    again in test (default 0.05 each: val and test are held-out byte ranges of the text, see
    :func:`gradcomp.apps.text.load_text_dataset`), ``max_train`` a deterministic subset.
    """
    if name in TEXT_DATASETS:
        return _load_text(name, data_dir, 0.05 if val_fraction is None else val_fraction,
                          split_seed, max_train, opts)
    if val_fraction is None:
        val_fraction = 0.1
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: "
                         f"{', '.join(list_datasets())}")
    if not (0.0 <= float(val_fraction) < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    require_int_range(split_seed, "split_seed", 0, _MAX_INT)
    if max_train is not None:
        require_int_range(max_train, "max_train", 1, _MAX_INT)
    fn = _REGISTRY[name]
    allowed = [p for p in inspect.signature(fn).parameters if p != "data_dir"]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; allowed: "
            f"{', '.join(allowed) or '(none)'}"
        )
    if data_dir is not None:
        if name in _BUILT_IN:
            raise ValueError(f"dataset {name!r} is built in and reads no files; drop --data-dir "
                             f"({data_dir})")
        if not Path(data_dir).expanduser().is_dir():
            raise DatasetNotFoundError(f"--data-dir {data_dir} does not exist or is not a "
                                       f"directory (dataset {name!r})")
    raw = fn(data_dir, **opts)

    n = len(raw.y_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * n)))
    if n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training samples out of {n}")
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if max_train is not None:
        train_idx = train_idx[:max_train]

    xtr = torch.from_numpy(np.ascontiguousarray(raw.x_train))
    ytr = torch.from_numpy(np.ascontiguousarray(raw.y_train)).to(torch.int64)
    scale = 1.0 / raw.scale
    mean, std = _channel_stats(xtr[train_idx].to(torch.float64).mul_(scale))
    # Fold scaling and normalisation into one affine map per channel: (x/scale - mean) / std.
    a = (scale / std).to(torch.float32).view(1, -1, 1, 1)
    b = (-mean / std).to(torch.float32).view(1, -1, 1, 1)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) * a + b).contiguous()

    def split(x: torch.Tensor, y: torch.Tensor) -> TensorSplit:
        return TensorSplit(norm(x), y.to(torch.int64).contiguous())

    xte = torch.from_numpy(np.ascontiguousarray(raw.x_test))
    yte = torch.from_numpy(np.ascontiguousarray(raw.y_test))
    c, h, w = raw.x_train.shape[1:]
    if h != w:
        raise ValueError(f"dataset {name!r}: images must be square, got {h}x{w}")
    return DatasetSplits(
        name=name,
        train=split(xtr[train_idx], ytr[train_idx]),
        val=split(xtr[val_idx], ytr[val_idx]),
        test=split(xte, yte),
        num_classes=raw.num_classes,
        in_channels=int(c),
        image_size=int(h),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )


# ----------------------------------------------------------------------------- loader


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so that nearby pairs give unrelated streams and no two pairs
    # collide the way seed + epoch would.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


class _BatchDataset(torch.utils.data.Dataset):
    """Index -> one whole batch, so DataLoader workers slice tensors instead of single samples."""

    def __init__(self, split: TensorSplit, batches: list[torch.Tensor]):
        self.split, self.batches = split, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        idx = self.batches[i]
        return self.split.x[idx], self.split.y[idx]


class BatchLoader:
    """Iterable of ``(x, y)`` batches whose order depends only on ``(seed, epoch)``.

    ``set_epoch(e)`` selects the permutation (epoch 0 until called); iterating twice without
    ``set_epoch`` repeats the same epoch. ``set_epoch(e, start_batch=k)`` skips the first ``k``
    batches of that epoch, so a run resumed mid-epoch sees exactly the remaining batches.
    ``len()`` is the number of batches in a full epoch (``drop_last`` drops a short last batch).
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        workers: int = 0,
        device=None,
    ):
        require_int_range(batch_size, "batch_size", 1, _MAX_INT)
        require_int_range(seed, "seed", 0, _MAX_INT)
        require_int_range(workers, "workers", 0, 1024)
        if not isinstance(split, TensorSplit):
            raise TypeError(f"split must be a TensorSplit, got {type(split).__name__}")
        self.batch_size, self.shuffle, self.seed = batch_size, bool(shuffle), seed
        self.drop_last, self.workers = bool(drop_last), workers
        self.device = None if device is None else torch.device(device)
        # In-memory path: move the split once, then every batch is a device-side gather.
        self.split = split if workers > 0 or self.device is None else split.to(self.device)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Select the epoch whose permutation the next iteration uses, from ``start_batch`` on."""
        require_int_range(epoch, "epoch", 0, _MAX_INT)
        require_int_range(start_batch, "start_batch", 0, len(self))
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> torch.Tensor:
        """The sample indices (CPU int64) of the current epoch, before batching."""
        n = len(self.split)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return torch.randperm(n, generator=g)

    def _batches(self, device=None) -> list[torch.Tensor]:
        order = self.order()
        if device is not None:
            order = order.to(device)  # one copy per epoch, not one per batch
        return list(order.split(self.batch_size))[self.start_batch : len(self)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.workers == 0:
            x, y = self.split.x, self.split.y
            for idx in self._batches(x.device):
                yield x[idx], y[idx]
            return
        batches = self._batches()
        pin = self.device is not None and self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(
            _BatchDataset(self.split, batches),
            batch_size=None,  # each item is already a batch
            shuffle=False,  # the order is ours, fixed by (seed, epoch)
            num_workers=self.workers,
            pin_memory=pin,
        )
        for xb, yb in dl:
            if self.device is not None:
                xb, yb = (
                    xb.to(self.device, non_blocking=True),
                    yb.to(self.device, non_blocking=True),
                )
            yield xb, yb


def make_loader(
    split: TensorSplit,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    workers: int = 0,
    device=None,
) -> BatchLoader:
    """A :class:`BatchLoader` over ``split``; see its docstring for the ordering contract.

    ``workers=0`` slices the in-memory tensors by a permutation (moved to ``device`` once);
    ``workers>0`` runs the same batches through DataLoader workers and moves each to ``device``.
    """
    return BatchLoader(
        split,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        workers=workers,
        device=device,
    )
