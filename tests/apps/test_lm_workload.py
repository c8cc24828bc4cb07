"""The text workloads end to end on a corpus written here: training (language model and
classifier) with validation loss / perplexity / accuracy, recipes on the transformer's linears,
exact resume, 2-rank data parallel, ``analyze`` (head apart, sigma spread) and the lm demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcomp.apps import text
from gradcomp.apps.analysis import sigma_spread, split_head
from gradcomp.apps.cli import main
from gradcomp.apps.data import load_dataset
from gradcomp.apps.distributed import launch_local
from gradcomp.apps.models import build_model
from gradcomp.apps.recipes import recipe_from_dict
from gradcomp.apps.text import flatten_logits
from gradcomp.apps.train import StepHook, TrainConfig, train

WORKS = [f"work{i}" for i in range(8)]  # shakespeare-works classifies the 8 longest works
CONTEXT = 16
# FP4 on the hidden linears (never the head), the layer choice the built-in recipes make on
# conv-less models, written out so these tests do not depend on it
FP4_LINEAR = {"name": "fp4-linear", "compression": {
    "quantize": {"format": "optimal", "bits": 4}, "types": ["linear"], "exclude": ["head"]}}
PRUNE_LINEAR = {"name": "prune-linear", "compression": {
    "prune": {"sparsity": 0.8, "method": "empirical"}, "types": ["linear"],
    "exclude": ["head"], "refresh_every": 1, "metrics_every": 1}}


def _write_corpus(d: Path, seed: int = 0) -> Path:
    """Eight works of different lengths and letter statistics (so the work is learnable)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(WORKS):
        n = 6000 + 500 * i
        p = np.ones(26)
        p[i * 3:(i + 1) * 3] = 8.0  # each work favours three letters
        letters = rng.choice(np.arange(97, 123, dtype=np.uint8), n, p=p / p.sum())
        letters[rng.random(n) < 0.15] = 32
        (d / f"{name}.txt").write_bytes(letters.tobytes())
    return d


@pytest.fixture
def corpus(monkeypatch, tmp_path):
    monkeypatch.delenv(text.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(text, "SYSTEM_ROOT", tmp_path / "no-system")
    return _write_corpus(tmp_path / "data" / "shakespeare").parent


def _cfg(corpus, **kw):
    base = dict(model="gpt-tiny", dataset="shakespeare", data_dir=str(corpus), context=CONTEXT,
                batch_size=8, width=32, optimizer="adamw", lr=1e-2, weight_decay=0.0,
                schedule="constant", progress=False, max_steps_per_epoch=4, epochs=2,
                max_test=48)
    return TrainConfig(**(base | kw))


def _val_metrics(model, data, n):
    """Mean cross-entropy and accuracy over the first n validation sequences, by hand."""
    model.eval()
    with torch.no_grad():
        out, y = flatten_logits(model(data.val.x[:n]), data.val.y[:n])
        loss = torch.nn.functional.cross_entropy(out, y).item()
        return loss, (out.argmax(1) == y).double().mean().item()


def test_load_dataset_dispatches_text(corpus):
    lm = load_dataset("shakespeare", corpus, context=CONTEXT)
    assert lm.task == "lm" and lm.context == CONTEXT and lm.train.x.shape[1] == CONTEXT
    cl = load_dataset("shakespeare-works", corpus, context=CONTEXT)
    assert cl.task == "classify" and cl.class_names == tuple(WORKS) and cl.train.y.dim() == 1
    with pytest.raises(ValueError, match="unknown option.*colour.*allowed: context"):
        load_dataset("shakespeare", corpus, colour=True)


def test_lm_trains_and_reports_val_perplexity(corpus, tmp_path):
    cfg = _cfg(corpus, out=str(tmp_path / "run"), max_steps_per_epoch=15)
    res = train(cfg)
    row = res.history[-1]
    assert "test_accuracy" not in row and math.isnan(res.test_accuracy)
    assert row["val_perplexity"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-12)
    assert res.val_perplexity == row["val_perplexity"]
    # the logged loss is the mean next-byte cross-entropy of the first max_test val sequences
    model = build_model("gpt-tiny", width=32, num_classes=256, context=CONTEXT)
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt",
                                     weights_only=False)["model"])
    data = load_dataset("shakespeare", corpus, context=CONTEXT)
    loss, acc = _val_metrics(model, data, 48)
    assert row["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert row["val_accuracy"] == pytest.approx(acc, abs=1e-9)
    # 30 steps learn at least the letter frequencies: far below the uniform ln 256 = 5.55
    assert row["val_loss"] < math.log(256) - 1.0
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_loss", "val_perplexity", "val_accuracy"} <= set(header)


def test_classifier_reports_val_accuracy(corpus, tmp_path):
    res = train(_cfg(corpus, model="bert-tiny", dataset="shakespeare-works",
                     out=str(tmp_path / "cl"), max_steps_per_epoch=10))
    row = res.history[-1]
    assert "val_perplexity" not in row and math.isnan(res.val_perplexity)
    model = build_model("bert-tiny", width=32, num_classes=8, context=CONTEXT)
    model.load_state_dict(torch.load(tmp_path / "cl" / "checkpoint.pt",
                                     weights_only=False)["model"])
    data = load_dataset("shakespeare-works", corpus, context=CONTEXT)
    loss, acc = _val_metrics(model, data, 48)
    assert row["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert row["val_accuracy"] == pytest.approx(acc, abs=1e-9)


def test_model_and_dataset_must_fit(corpus):
    with pytest.raises(ValueError, match="gpt-tiny.*shakespeare-works.*bert or bert-tiny"):
        train(_cfg(corpus, dataset="shakespeare-works"))
    with pytest.raises(ValueError, match="bert-tiny.*does not fit.*gpt or gpt-tiny"):
        train(_cfg(corpus, model="bert-tiny"))
    with pytest.raises(ValueError, match="reads token sequences"):
        train(TrainConfig(model="gpt-tiny", dataset="synthetic", progress=False))
    with pytest.raises(ValueError, match="context applies to the text datasets only"):
        TrainConfig(model="mlp", dataset="digits", context=32)


@pytest.mark.parametrize("recipe", [FP4_LINEAR, PRUNE_LINEAR, "fp4", "fp4-dynamic",
                                    "prune-0.85-het-emp"])
def test_recipes_compress_the_hidden_linears(corpus, recipe):
    res = train(_cfg(corpus, recipe=recipe_from_dict(recipe) if isinstance(recipe, dict)
                     else recipe, epochs=1, max_steps_per_epoch=12))
    row = res.history[-1]
    assert math.isfinite(row["val_loss"])
    if isinstance(recipe, str):  # built-in recipes select the hidden linears of a conv-less model
        if recipe.startswith("fp4"):
            assert row["bits_per_element"] == 4
        else:
            assert 0 < row["sparsity"] < 1
    elif "quantize" in recipe["compression"]:
        assert row["bits_per_element"] == 4
    else:  # 80% target, empirical threshold on a 16384 sample: a few points at most
        assert abs(row["sparsity"] - 0.8) < 0.05


class _Boom(StepHook):
    def around(self, step):
        if step == 6:
            raise RuntimeError("boom")
        return super().around(step)


def test_lm_resume_is_exact(corpus, tmp_path):
    kw = dict(recipe=recipe_from_dict(PRUNE_LINEAR), epochs=3, max_steps_per_epoch=4)
    ref = train(_cfg(corpus, out=str(tmp_path / "ref"), **kw))
    with pytest.raises(RuntimeError, match="boom"):  # dies inside epoch 2
        train(_cfg(corpus, out=str(tmp_path / "cut"), **kw), _Boom())
    res = train(_cfg(corpus, out=str(tmp_path / "cut"), resume=True, **kw))

    def strip(h):  # as text, so that NaN columns compare equal
        return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in h])

    assert strip(res.history) == strip(ref.history)
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lm_two_ranks(corpus, tmp_path):
    out = tmp_path / "ddp"
    assert launch_local(_cfg(corpus, out=str(out), epochs=1, max_steps_per_epoch=3), 2) == 0
    row = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert math.isfinite(row["val_perplexity"]) and row["val_perplexity"] < 256 * 1.5


def test_split_head_and_sigma_spread():
    def row(layer, step, mu, sigma):
        return {"layer": layer, "step": step, "mu": mu, "sigma": sigma}

    rows = [row("a", 0, -10.0, 1.0), row("b", 0, -10.0, 1.0), row("head", 0, -5.0, 0.5)]
    hidden, head = split_head(rows)
    assert [r["layer"] for r in head] == ["head"] and len(hidden) == 2
    (s,) = sigma_spread(hidden, octaves=4.0)
    # equal layers: one shared scale covers them as well as per-layer scales do
    expect = math.erf(4 * math.log(2) / 2 / math.sqrt(2))  # 2 Phi(R / 2 sigma) - 1
    assert s["in_range_per_layer_mean"] == pytest.approx(expect, rel=1e-9)
    assert s["in_range_global_mean"] == pytest.approx(expect, abs=1e-3)
    assert s["mu_spread_octaves"] == 0.0
    # centres 16 octaves apart with a range of 4: one scale loses a whole layer
    far = [row("a", 0, 0.0, 1.0), row("b", 0, 16 * math.log(2), 1.0)]
    (f,) = sigma_spread(far, octaves=4.0)
    assert f["mu_spread_octaves"] == pytest.approx(16.0)
    assert f["in_range_global_worst"] < 1e-6 < f["in_range_per_layer_worst"]


def test_analyze_cli_on_gpt(corpus, tmp_path, capsys):
    assert main(["analyze", "--model", "gpt-tiny", "--dataset", "shakespeare", "--data-dir",
                 str(corpus), "--context", str(CONTEXT), "--steps", "4", "--points", "2",
                 "--batch-size", "4", "--width", "32", "--sample-size", "3000",
                 "--ks-sample", "3000", "--no-plots", "--json", "--out",
                 str(tmp_path / "an")]) == 0
    res = json.loads(capsys.readouterr().out)
    # gpt-tiny: 2 blocks x (q, k, v, out, up, down) hidden linears, 2 capture points
    assert res["summary"]["neural"]["lognormal"]["n"] == 2 * 6 * 2
    assert res["summary_head"]["lognormal"]["n"] == 2
    assert [s["step"] for s in res["sigma_spread"]] == [0, 3]
    assert math.isfinite(res["val_perplexity"])


def test_demo_lm_quick(corpus, tmp_path, capsys):
    recipe = tmp_path / "fp4lin.json"
    recipe.write_text(json.dumps(FP4_LINEAR))
    out = tmp_path / "demo"
    assert main(["demo", "--workload", "lm", "--steps", "11", "--recipes", f"baseline,{recipe}",
                 "--data-dir", str(corpus), "--context", str(CONTEXT), "--batch-size", "4",
                 "--width", "32", "--quiet", "--out", str(out)]) == 0
    assert "val perplexity" in capsys.readouterr().out
    rows = json.loads((out / "demo.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["baseline", str(recipe)]
    assert rows[0]["delta_perplexity"] == 0.0 and rows[1]["bits_per_element"] == 4
    assert rows[1]["delta_perplexity"] == pytest.approx(
        rows[1]["val_perplexity"] - rows[0]["val_perplexity"])


def test_gemmcheck_on_the_transformer(corpus):
    """Per-GEMM diagnostics on gpt-tiny: every hidden linear and the head captured with 3-D
    (batch, tokens, features) operands; an unbiased scheme's bias z-score stays small and the
    cosine to the full-precision products is high; an image model on text is one clear error."""
    from gradcomp.apps.gemmcheck import capture_gemm_operands, gemm_diagnostics

    recs = capture_gemm_operands("gpt-tiny", "shakespeare", steps=3, batch_size=8,
                                 data_dir=str(corpus), context=CONTEXT)
    assert len(recs) >= 13 and all(r.kind == "linear" for r in recs)
    assert all(r.x.dim() == 3 and r.grad.dim() == 3 for r in recs)
    from gradcomp.apps.gemmcheck import SCHEMES

    rows = gemm_diagnostics(recs[:3], {"fp4-sr": SCHEMES["fp4-sr"]}, draws=4, seed=0)
    assert rows and all(0.5 < r["cosine"] <= 1.0 + 1e-6 for r in rows)
    with pytest.raises(ValueError, match="reads token sequences|cannot be built|does not fit"):
        capture_gemm_operands("cnn", "shakespeare", steps=1, data_dir=str(corpus),
                              context=CONTEXT)
