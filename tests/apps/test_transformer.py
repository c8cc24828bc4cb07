"""Transformers: shapes, causality, named linears, GPT-2 init, layer selection, falling loss."""

from __future__ import annotations

import codecs
import math
import this

import pytest
import torch
from torch import nn

from gradcomp import capture_gradients, compress_gradients
from gradcomp.apps.models import build_model
from gradcomp.apps.text import encode, flatten_logits
from gradcomp.integration.wrap import CompressionConfig, PruneSpec

SEQ = ("gpt", "gpt-tiny", "bert", "bert-tiny")
SMALL = {"width": 16, "depth": 2, "heads": 2, "context": 12}


def _linear_names(m: nn.Module) -> list[str]:
    return [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]


def _expected_linears(depth: int) -> list[str]:
    per_block = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.up",
                 "mlp.down"]
    return [f"blocks.{i}.{n}" for i in range(depth) for n in per_block] + ["head"]


@pytest.mark.parametrize("name", SEQ)
def test_shapes_backward_and_layer_names(name):
    torch.manual_seed(0)
    classes = 256 if name.startswith("gpt") else 5
    m = build_model(name, num_classes=classes, **SMALL)
    x = torch.randint(0, 256, (3, 10))
    out = m(x)
    want = (3, 10, 256) if name.startswith("gpt") else (3, 5)
    assert out.shape == want and out.dtype == torch.float32
    out.float().logsumexp(-1).sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert _linear_names(m) == _expected_linears(2)
    assert m.task == ("lm" if name.startswith("gpt") else "classify")


def test_default_sizes_and_parameter_count():
    # Exact count from the architecture: embeddings V*d + C*d; per block 4 (d^2 + d) attention,
    # (d*4d + 4d) + (4d*d + d) MLP, two LayerNorms 2*2d; final LayerNorm 2d; head tied (0).
    def count(v, c, d, depth):
        return v * d + c * d + depth * (4 * (d * d + d) + 8 * d * d + 5 * d + 4 * d) + 2 * d

    for name, (d, depth, c) in {"gpt": (128, 4, 128), "gpt-tiny": (64, 2, 64)}.items():
        m = build_model(name, num_classes=256)
        assert sum(p.numel() for p in m.parameters()) == count(256, c, d, depth)
        assert m.context == c and len(m.blocks) == depth and m.width == d
    # bert: same trunk, an untied head d*K + K.
    b = build_model("bert", num_classes=8)
    assert sum(p.numel() for p in b.parameters()) == count(256, 128, 128, 4) + 128 * 8 + 8
    assert 0.2e6 < count(256, 128, 128, 4) < 2e6


def test_gpt_is_causal_and_bert_is_not():
    torch.manual_seed(1)
    gpt = build_model("gpt-tiny", num_classes=256, **SMALL).eval()
    bert = build_model("bert-tiny", num_classes=4, **SMALL).eval()
    x = torch.randint(0, 256, (2, 12))
    x2 = x.clone()
    x2[:, 7] = (x2[:, 7] + 1) % 256
    a, b = gpt(x), gpt(x2)
    assert torch.equal(a[:, :7], b[:, :7])  # earlier positions never see token 7
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    # The encoder is bidirectional: position 0's feature depends on token 7.
    fa, fb = bert.features(x), bert.features(x2)
    assert not torch.allclose(fa[:, 0], fb[:, 0])


def test_cls_pool_and_tied_head():
    torch.manual_seed(2)
    m = build_model("bert-tiny", num_classes=3, pool="cls", **SMALL)
    assert m(torch.randint(0, 256, (2, 11))).shape == (2, 3)
    with pytest.raises(ValueError, match="context - 1"):
        m(torch.randint(0, 256, (2, 12)))  # the [CLS] vector takes one position
    tied = build_model("gpt-tiny", num_classes=256, **SMALL)
    assert tied.head.weight is tied.tok_emb.weight
    untied = build_model("gpt-tiny", num_classes=256, tie_head=False, **SMALL)
    assert untied.head.weight is not untied.tok_emb.weight


def test_gpt2_init_and_repeatable_builds():
    torch.manual_seed(3)
    m = build_model("gpt")  # width 128, depth 4
    torch.manual_seed(3)
    m2 = build_model("gpt")
    for (n, p), (_, q) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, q), n
    # Sample std of n normal draws has relative standard error 1/sqrt(2n); allow 5 of them.
    for name, std in (("blocks.0.attn.q_proj", 0.02), ("blocks.0.mlp.up", 0.02),
                      ("blocks.2.attn.out_proj", 0.02 / math.sqrt(8)),
                      ("blocks.3.mlp.down", 0.02 / math.sqrt(8))):
        w = m.get_submodule(name).weight
        assert abs(w.std().item() / std - 1) < 5 / math.sqrt(2 * w.numel()), name
        assert torch.equal(m.get_submodule(name).bias, torch.zeros_like(w[:, 0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by heads"):
        build_model("gpt-tiny", num_classes=256, width=30, heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("gpt-tiny", num_classes=256, vocab_size=100)
    with pytest.raises(ValueError, match="pool"):
        build_model("bert-tiny", num_classes=2, pool="max")
    with pytest.raises(ValueError, match="unknown option"):
        build_model("gpt", num_classes=256, hidden=(3,))
    with pytest.raises(TypeError, match="depth"):
        build_model("gpt", num_classes=256, depth=2.0)
    m = build_model("gpt-tiny", num_classes=256, **SMALL)
    with pytest.raises(ValueError, match="context=12"):
        m(torch.randint(0, 256, (1, 13)))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.rand(1, 4))


def test_compress_gradients_selects_projections_by_type_and_name():
    torch.manual_seed(4)
    m = build_model("gpt-tiny", num_classes=256, **SMALL)
    h = compress_gradients(m, CompressionConfig(types=("linear",)))
    assert h.layers == _expected_linears(2)
    h.remove()
    names = ("blocks.0.attn.q_proj", "blocks.1.mlp.down", "head")
    h = compress_gradients(m, CompressionConfig(names=names, prune=PruneSpec(sparsity=0.8),
                                              sample_size=1024))
    assert h.layers == list(names)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randint(0, 256, (4, 12))
    for _ in range(2):  # step 1 gathers statistics, step 2 prunes
        loss = nn.functional.cross_entropy(*flatten_logits(m(x[:, :-1]), x[:, 1:]))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        h.step(opt)


def test_capture_records_every_projection():
    torch.manual_seed(6)
    m = build_model("bert-tiny", num_classes=3, **SMALL)
    x = torch.randint(0, 256, (4, 12))
    with capture_gradients(m, sample_size=100) as cap:
        with cap.record(0):
            nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 0])).backward()
    recs = cap.by("neural", step=0)
    assert sorted(r.name for r in recs) == sorted(_expected_linears(2))
    shapes = {r.name: r.shape for r in recs}
    assert shapes["blocks.1.mlp.up"] == (4, 12, 64) and shapes["head"] == (4, 3)


def _zen() -> torch.Tensor:
    return encode(codecs.decode(this.s, "rot13"))  # the Zen of Python: 856 bytes of English


def test_tiny_gpt_loss_falls_on_english():
    torch.manual_seed(5)
    tokens = _zen()
    t = 32
    starts = torch.arange(0, len(tokens) - t - 1, 7)
    x = torch.stack([tokens[s:s + t] for s in starts])
    y = torch.stack([tokens[s + 1:s + t + 1] for s in starts])
    m = build_model("gpt-tiny", num_classes=256, width=32, depth=2, heads=2, context=t)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        idx = torch.randint(0, len(x), (16,), generator=g)
        loss = nn.functional.cross_entropy(*flatten_logits(m(x[idx]), y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Starts at the uniform ln 256 = 5.55 (N(0, 0.02) init); English letters alone carry about
    # 4.1 bits = 2.9 nats per byte, so < 3 means the model learned at least the byte frequencies.
    assert abs(losses[0] - math.log(256)) < 0.1
    assert sum(losses[-5:]) / 5 < 3.0
