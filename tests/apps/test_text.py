"""Text datasets on corpora written here: tokens, search order, disjoint splits, balance, loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gradcomp.apps import text
from gradcomp.apps.data import DatasetNotFoundError, make_loader
from gradcomp.apps.text import (
    TokenSplit,
    decode,
    encode,
    find_corpus,
    flatten_logits,
    load_text_dataset,
)

# Work name -> length in bytes (different lengths, so "the longest works" is well defined).
SIZES = {"alpha": 9000, "beta": 6000, "gamma": 4500, "delta": 3000, "tiny": 40}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    # Keep $GRADCOMP_DATA, the user's corpus and /usr/share out unless a test opts in.
    monkeypatch.delenv(text.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(text, "SYSTEM_ROOT", tmp_path / "no-system")


def _write_corpus(d: Path, seed: int = 0, sizes=SIZES) -> dict[str, bytes]:
    """Random lowercase words: every 9-byte window is unique with overwhelming probability
    (26^9 = 5e12 possible windows), so a window identifies its position."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in sizes.items():
        letters = rng.integers(97, 123, n, dtype=np.uint8)
        letters[rng.random(n) < 0.15] = 32  # spaces
        out[name] = letters.tobytes()
        (d / f"{name}.txt").write_bytes(out[name])
    return out


def _locate(works: dict[str, bytes], win: int) -> dict[bytes, tuple[str, int]]:
    """Every window at offsets 0, win, 2 win... of every work -> (work, offset)."""
    table = {}
    for w, b in works.items():
        for off in range(0, len(b) - win + 1, win):
            table[b[off:off + win]] = (w, off)
    return table


def _rows(split: TokenSplit, lm: bool) -> list[bytes]:
    x = split.x.to(torch.uint8).numpy()
    if lm:  # the window is x followed by the last target
        x = np.concatenate([x, split.y[:, -1:].to(torch.uint8).numpy()], axis=1)
    return [r.tobytes() for r in x]


def test_encode_decode_exact():
    s = "To be, or not to be -- that is the question: ß∂ 🙂\n"
    t = encode(s)
    assert t.dtype == torch.int64 and t.tolist() == list(s.encode("utf-8"))
    assert decode(t) == s and decode(encode(b"\x00\xff")) == "\x00\ufffd"
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        decode(torch.tensor([256]))
    with pytest.raises(TypeError, match="integers"):
        decode(torch.tensor([1.0]))


def test_lm_windows_shift_and_shapes(tmp_path):
    _write_corpus(tmp_path / "shakespeare")
    d = load_text_dataset(data_dir=tmp_path, context=8)
    assert d.task == "lm" and d.vocab_size == 256 and d.num_classes == 256 and d.context == 8
    assert d.works == tuple(sorted(SIZES)) and d.class_names == ()
    assert d.model_kwargs() == {"num_classes": 256, "context": 8}
    for s in (d.train, d.val, d.test):
        assert isinstance(s, TokenSplit) and s.x.dtype == s.y.dtype == torch.int64
        assert s.x.shape == s.y.shape and s.x.shape[1] == 8 and len(s) > 0
        assert torch.equal(s.y[:, :-1], s.x[:, 1:])  # y is x shifted by one byte


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_splits_are_disjoint_windows_of_the_text(tmp_path, task):
    works = _write_corpus(tmp_path / "shakespeare")
    d = load_text_dataset(data_dir=tmp_path, task=task, context=8, chunk=4, val_fraction=0.1,
                          test_fraction=0.2, works=["alpha", "beta", "gamma", "delta"])
    win = 9 if task == "lm" else 8
    table = _locate(works, win)
    where = {}
    for split in ("train", "val", "test"):
        rows = _rows(getattr(d, split), task == "lm")
        pos = [table[r] for r in rows]  # KeyError: a sample that is not an aligned window
        assert len(set(pos)) == len(pos)
        where[split] = set(pos)
        if task == "classify":  # the label names the work the passage came from
            labels = getattr(d, split).y.tolist()
            assert [d.class_names[i] for i in labels] == [w for w, _ in pos]
    assert not (where["train"] & where["val"] or where["train"] & where["test"]
                or where["val"] & where["test"])
    if task == "lm":  # nothing lost: every window of the 4 works is in exactly one split
        every = {v for v in table.values() if v[0] != "tiny"}
        assert where["train"] | where["val"] | where["test"] == every
        # Chunk fractions per work: round(0.1 n) val and round(0.2 n) test chunks of 4 windows.
        n_chunks = -(-(9000 // 9) // 4)  # alpha: 1000 windows, 250 chunks
        assert sum(w == "alpha" for w, _ in where["val"]) == 4 * round(0.1 * n_chunks)
        assert sum(w == "alpha" for w, _ in where["test"]) == 4 * round(0.2 * n_chunks)


def test_split_is_seeded_and_independent_of_other_works(tmp_path):
    works = _write_corpus(tmp_path / "shakespeare")
    a = load_text_dataset(data_dir=tmp_path, context=8)
    b = load_text_dataset(data_dir=tmp_path, context=8)
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s).x, getattr(b, s).x)
    c = load_text_dataset(data_dir=tmp_path, context=8, split_seed=1)
    assert not torch.equal(a.val.x, c.val.x)
    # beta's split is the same whether or not the other works are loaded.
    table = _locate(works, 9)
    only = load_text_dataset(data_dir=tmp_path, context=8, works=["beta"])
    for s in ("train", "val", "test"):
        in_all = [r for r in _rows(getattr(a, s), True) if table[r][0] == "beta"]
        assert _rows(getattr(only, s), True) == in_all and in_all


def test_classify_balanced_longest_works(tmp_path):
    _write_corpus(tmp_path / "shakespeare")
    d = load_text_dataset(data_dir=tmp_path, task="classify", context=16, num_works=3, chunk=2)
    # The 3 longest works, in name order.
    assert d.class_names == ("alpha", "beta", "gamma") and d.num_classes == 3
    assert d.model_kwargs() == {"num_classes": 3, "context": 16, "vocab_size": 256}
    for s in (d.train, d.val, d.test):
        counts = torch.bincount(s.y, minlength=3)
        assert s.x.shape == (len(s), 16) and s.y.shape == (len(s),)
        assert len(set(counts.tolist())) == 1 and counts[0] > 0  # exactly balanced
    # gamma is the shortest: 4500 // 16 = 281 passages -> it fixes the per-class count.
    assert len(d.train) + len(d.val) + len(d.test) <= 3 * (4500 // 16)
    m = load_text_dataset(data_dir=tmp_path, task="classify", context=16, num_works=3,
                          max_train=31)
    assert torch.bincount(m.train.y).tolist() == [10, 10, 10]


def test_lm_max_train_is_a_fixed_subset(tmp_path):
    _write_corpus(tmp_path / "shakespeare")
    full = load_text_dataset(data_dir=tmp_path, context=8)
    sub = load_text_dataset(data_dir=tmp_path, context=8, max_train=50)
    sub2 = load_text_dataset(data_dir=tmp_path, context=8, max_train=50)
    assert len(sub.train) == 50 and torch.equal(sub.train.x, sub2.train.x)
    assert set(_rows(sub.train, True)) <= set(_rows(full.train, True))
    assert torch.equal(sub.val.x, full.val.x)


def test_loader_order_depends_only_on_seed_and_epoch(tmp_path):
    _write_corpus(tmp_path / "shakespeare")
    d = load_text_dataset(data_dir=tmp_path, context=8)

    def epoch(seed, e):
        loader = make_loader(d.train, 16, shuffle=True, seed=seed, drop_last=True)
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b = epoch(3, 1), epoch(3, 1)
    assert len(a) == len(d.train) // 16
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    for other in (epoch(3, 2), epoch(4, 1)):
        assert not torch.equal(a[0][0], other[0][0])
    x, y = a[0]
    assert x.shape == y.shape == (16, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    # The device path (split moved once with TokenSplit.to) and worker processes give the same
    # batches.
    for opts in ({"device": "cpu"}, {"workers": 1}):
        loader = make_loader(d.train, 16, shuffle=True, seed=3, drop_last=True, **opts)
        loader.set_epoch(1)
        got = list(loader)
        assert len(got) == len(a) and all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1])
                                          for g, w in zip(got, a))


def test_missing_corpus_names_every_place_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(text.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_text_dataset(data_dir=tmp_path / "mine")
    msg = str(e.value)
    assert "\n" not in msg and "'shakespeare' not found" in msg and "make corpus" in msg
    for p in (tmp_path / "mine" / "shakespeare", tmp_path / "env" / "shakespeare",
              tmp_path / "xdg" / "gradcomp" / "datasets" / "shakespeare",
              tmp_path / "no-system" / "shakespeare"):
        assert str(p) in msg


def test_search_order(tmp_path, monkeypatch):
    user = tmp_path / "xdg" / "gradcomp" / "datasets" / "shakespeare"
    _write_corpus(user, sizes={"u": 100})
    assert find_corpus() == user  # the place `make corpus` writes
    _write_corpus(tmp_path / "env", sizes={"e": 100})  # a root holding the files directly
    monkeypatch.setenv(text.ENV_VAR, str(tmp_path / "env"))
    assert find_corpus() == tmp_path / "env"
    _write_corpus(tmp_path / "mine" / "shakespeare", sizes={"m": 100})
    assert find_corpus(data_dir=tmp_path / "mine") == tmp_path / "mine" / "shakespeare"
    (tmp_path / "empty").mkdir()  # no *.txt: skipped
    assert find_corpus(data_dir=tmp_path / "empty") == tmp_path / "env"


def test_bad_arguments(tmp_path):
    _write_corpus(tmp_path / "shakespeare")
    kw = {"data_dir": tmp_path}
    with pytest.raises(ValueError, match="valid corpora: shakespeare"):
        load_text_dataset("fortunes", **kw)
    with pytest.raises(ValueError, match="task must be one of"):
        load_text_dataset(task="mlm", **kw)
    with pytest.raises(ValueError, match="context"):
        load_text_dataset(context=0, **kw)
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_dataset(val_fraction=1.0, **kw)
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction"):
        load_text_dataset(val_fraction=0.5, test_fraction=0.5, **kw)
    with pytest.raises(ValueError, match="available: alpha"):
        load_text_dataset(works=["alpha", "omega"], **kw)
    with pytest.raises(ValueError, match="shorter than one passage"):
        load_text_dataset(task="classify", works=["alpha", "tiny"], context=64, **kw)
    with pytest.raises(ValueError, match="num_works"):
        load_text_dataset(task="classify", num_works=1, **kw)
    with pytest.raises(ValueError, match="val split .* is empty"):
        load_text_dataset(works=["alpha"], context=2000, chunk=4, **kw)
    with pytest.raises(ValueError, match="int64"):
        TokenSplit(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64))


def test_flatten_logits():
    out, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    o, t = flatten_logits(out, y)
    assert o.shape == (10, 7) and torch.equal(o[6], out[1, 1]) and t[6] == y[1, 1]
    o, t = flatten_logits(out[:, 0], y[:, 0])
    assert o.shape == (2, 7) and t.shape == (2,)
    with pytest.raises(ValueError, match="do not pair up"):
        flatten_logits(out, y[:, 0])
