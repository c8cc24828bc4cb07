"""Small transformers on token ids: a decoder-only language model and an encoder classifier.

Both are plain torch modules whose every GEMM with weights is an ``nn.Linear`` with a name that
says what it is, so layer selection by type (``linear``) or by name works::

    blocks.{i}.attn.q_proj / k_proj / v_proj / out_proj   attention projections, width -> width
    blocks.{i}.mlp.up / mlp.down                           MLP, width -> mlp_ratio*width -> width
    head                                                   LM: width -> vocabulary; encoder:
                                                           width -> classes

Block (pre-norm, as GPT-2): ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))`` with GELU (tanh-free,
exact erf form) in the MLP and a final LayerNorm ``ln_f`` before the head. Attention is
``F.scaled_dot_product_attention`` (softmax(q k^T / sqrt(head_dim)) v), causal for the language
model, bidirectional for the encoder; the two attention matmuls have no weights and are therefore
not layers to select.

Initialisation (GPT-2): every Linear weight and both embeddings ~ N(0, 0.02^2), biases 0,
LayerNorm gamma 1 beta 0, and the two projections that write into the residual stream
(``out_proj``, ``mlp.down``) ~ N(0, (0.02 / sqrt(2 depth))^2) so that the stream's variance does
not grow with depth. Drawn from torch's global RNG: ``torch.manual_seed`` makes builds repeat.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gradcomp.numerics._checks import require_choice, require_int_range

__all__ = ["GPT", "BertClassifier", "TransformerBlock", "SelfAttention", "build_gpt", "build_bert"]

_MAX = 1 << 20
_INIT_STD = 0.02


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``."""

    def __init__(self, width: int, heads: int, *, causal: bool, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads, self.causal, self.dropout = heads, causal, float(dropout)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, C/H)
            return z.view(b, t, h, c // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
            dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal,
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class MLPBlock(nn.Module):
    """``down(GELU(up(x)))`` with hidden width ``mlp_ratio * width``."""

    def __init__(self, width: int, mlp_ratio: int):
        super().__init__()
        self.up = nn.Linear(width, mlp_ratio * width)
        self.act = nn.GELU()
        self.down = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` (dropout on both branches)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, causal: bool, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal=causal, dropout=dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLPBlock(width, mlp_ratio)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class _Trunk(nn.Module):
    """Token + learned position embeddings, ``depth`` blocks, final LayerNorm ``ln_f``."""

    # build_model leaves the weights as initialised here (GPT-2 scheme, module docstring)
    # instead of applying its Kaiming init for ReLU networks.
    self_initialised = True

    def __init__(self, vocab_size, context, width, depth, heads, mlp_ratio, dropout, *, causal):
        super().__init__()
        for v, name in ((vocab_size, "vocab_size"), (context, "context"), (width, "width"),
                        (depth, "depth"), (heads, "heads"), (mlp_ratio, "mlp_ratio")):
            require_int_range(v, name, 1, _MAX)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.context, self.width, self.depth = vocab_size, context, width, depth
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, causal=causal, dropout=dropout)
            for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(width)

    def _init_weights(self) -> None:
        resid_std = _INIT_STD / math.sqrt(2 * self.depth)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = resid_std if name.endswith(("out_proj", "mlp.down")) else _INIT_STD
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, _INIT_STD)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _check_ids(idx: torch.Tensor, limit: int, bound: str, note: str = "") -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input must be int64/int32 token ids (B, T), got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        if not 1 <= idx.shape[1] <= limit:
            raise ValueError(f"sequence length {idx.shape[1]} must be in [1, {bound}]{note}")

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) checked token ids -> (B, T, width) token embeddings (before positions)."""
        self._check_ids(idx, self.context, f"context={self.context}")
        return self.tok_emb(idx)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T', width) after ``ln_f`` (T' = T, or T + 1 with a [CLS])."""
        x = self._embed(idx)
        x = self.drop(x + self.pos_emb(torch.arange(x.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


class GPT(_Trunk):
    """Decoder-only language model: (B, T) token ids -> (B, T, vocab_size) next-token logits.

    Causal: the logits at position t depend only on tokens 0..t. ``tie_head`` shares the head's
    weight with the token embedding (GPT-2); the head has no bias either way.
    """

    task = "lm"

    def __init__(self, vocab_size: int = 256, context: int = 128, width: int = 128,
                 depth: int = 4, heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0,
                 tie_head: bool = True):
        super().__init__(vocab_size, context, width, depth, heads, mlp_ratio, dropout,
                         causal=True)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self._init_weights()
        if tie_head:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(idx))


class BertClassifier(_Trunk):
    """Bidirectional encoder classifier: (B, T) token ids -> (B, num_classes) logits.

    ``pool="mean"`` averages the final features over the T positions; ``pool="cls"`` prepends a
    learned [CLS] vector (its own position, so T <= context - 1) and reads its final feature.
    """

    task = "classify"

    def __init__(self, vocab_size: int = 256, num_classes: int = 2, context: int = 128,
                 width: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 4,
                 dropout: float = 0.0, pool: str = "mean"):
        require_choice(pool, "pool", ("mean", "cls"))
        require_int_range(num_classes, "num_classes", 1, _MAX)
        super().__init__(vocab_size, context, width, depth, heads, mlp_ratio, dropout,
                         causal=False)
        self.pool = pool
        self.cls = nn.Parameter(torch.zeros(width)) if pool == "cls" else None
        self.head = nn.Linear(width, num_classes)
        self._init_weights()
        if self.cls is not None:
            nn.init.normal_(self.cls, 0.0, _INIT_STD)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        if self.cls is None:
            return super()._embed(idx)
        self._check_ids(idx, self.context - 1, f"context - 1 = {self.context - 1}",
                        " with pool='cls' (the [CLS] vector takes a position)")
        return torch.cat([self.cls.expand(idx.shape[0], 1, -1), self.tok_emb(idx)], dim=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.features(idx)
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))


# ----------------------------------------------------------------------------- registry builders
# Registry signature: (in_channels, num_classes, width, image_size, **options). The sequence
# models read token ids, so in_channels and image_size do not describe their input; their length
# is ``context``.


def build_gpt(*, width: int, depth: int, heads: int, context: int):
    """A registry builder for a GPT with these defaults. Its ``num_classes`` is the vocabulary
    (the next-token classes, 256 for byte-level text); ``vocab_size`` must equal it if given."""
    defaults = {"width": width, "depth": depth, "heads": heads, "context": context}

    def build(in_channels, num_classes, width=None, image_size=None, *,
              context: int = defaults["context"], depth: int = defaults["depth"],
              heads: int = defaults["heads"], mlp_ratio: int = 4, dropout: float = 0.0,
              tie_head: bool = True, vocab_size: int | None = None) -> GPT:
        if vocab_size is not None and vocab_size != num_classes:
            raise ValueError(f"gpt: vocab_size ({vocab_size}) must equal num_classes "
                             f"({num_classes}): the model predicts the next token")
        if not isinstance(tie_head, bool):
            raise TypeError(f"tie_head must be a bool, got {tie_head!r}")
        return GPT(num_classes, context, width or defaults["width"], depth, heads, mlp_ratio,
                   dropout, tie_head)

    return build


def build_bert(*, width: int, depth: int, heads: int, context: int):
    """A registry builder for an encoder classifier with these defaults (``vocab_size`` 256:
    bytes)."""
    defaults = {"width": width, "depth": depth, "heads": heads, "context": context}

    def build(in_channels, num_classes, width=None, image_size=None, *,
              context: int = defaults["context"], depth: int = defaults["depth"],
              heads: int = defaults["heads"], mlp_ratio: int = 4, dropout: float = 0.0,
              pool: str = "mean", vocab_size: int = 256) -> BertClassifier:
        return BertClassifier(vocab_size, num_classes, context, width or defaults["width"],
                              depth, heads, mlp_ratio, dropout, pool)

    return build
