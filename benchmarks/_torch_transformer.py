"""The PyTorch twin of `bfx.Transformer`, for `benchmarks/transformer.py`: the same
decoder-only, pre-norm Transformer (written here from the library's model), trained
by backprop, eager, with `torch.optim.Adam`. [`twin`][] builds it with the weights of
one of ours, so that both take their step from the same point on the same batch.
Imported only when PyTorch is installed (`.venv-bench`)."""

from collections.abc import Callable

import numpy as np
import torch  # pyright: ignore[reportMissingImports]
from jaxtyping import Float, Int
from torch import nn  # pyright: ignore[reportMissingImports]
from torch.nn import functional as F  # pyright: ignore[reportMissingImports]

import bioflax_eqx as bfx

from ._torch import LR


PROJECTIONS = ("query_proj", "key_proj", "value_proj", "output_proj")


class Block(nn.Module):
    """`u = h + Attn(LN₁(h))`, then `u + W₂ gelu(W₁ LN₂(u) + b₁) + b₂`, as
    `bfx.TransformerBlock` computes them: `eqx.nn.MultiheadAttention`'s defaults (no
    bias on the four projections, `width / heads` features per head, scores over
    `√(width / heads)`, causal), `eqx.nn.LayerNorm`'s (ε = 1e-5, a weight and a
    bias), and the tanh form of gelu (`jax.nn.gelu`'s default)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width, eps=1e-5)
        for name in PROJECTIONS:
            setattr(self, name, nn.Linear(width, width, bias=False))
        self.mlp_norm = nn.LayerNorm(width, eps=1e-5)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, h):
        batch, seq, width = h.shape
        n = self.attention_norm(h)
        q, k, v = (
            getattr(self, name)(n).view(batch, seq, self.heads, -1).transpose(1, 2)
            for name in PROJECTIONS[:3]
        )
        # PyTorch's fused attention: softmax(q kᵀ / √d + causal mask) v, the same
        # function as ours, at its best in eager mode.
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        u = h + self.output_proj(mixed.transpose(1, 2).reshape(batch, seq, width))
        return u + self.down(F.gelu(self.up(self.mlp_norm(u)), approximate="tanh"))


class Transformer(nn.Module):
    """Token embedding + learned positions, the blocks, a final LayerNorm and the
    output projection: next-token logits at every position of a batch of
    sequences."""

    def __init__(
        self, vocab_size: int, context: int, width: int, depth: int, heads: int
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, tokens):
        h = self.embedding(tokens) + self.positions[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(h)))


def twin(model: bfx.Transformer) -> Transformer:
    """The PyTorch Transformer with `model`'s sizes and weights (`model` on backprop:
    plain layers, no feedback).

    **Arguments:**

    - `model`: a `bfx.Transformer`, not converted to a rule.

    **Returns:**

    A `Transformer` computing the same logits, float32.
    """
    heads = model.blocks[0].attention.num_heads
    out = Transformer(model.vocab_size, model.context, model.width, model.depth, heads)
    # (torch module, Equinox module) pairs whose parameters have the same names and
    # layouts (`weight` as (outputs, inputs) in both); `out`'s own is `positions`.
    pairs = [(out.embedding, model.embedding), (out, model)]
    pairs += [(out.norm, model.norm), (out.head, model.head)]
    for mine, theirs in zip(out.blocks, model.blocks):
        pairs += [(getattr(mine, p), getattr(theirs.attention, p)) for p in PROJECTIONS]
        pairs += [(getattr(mine, p), getattr(theirs, p)) for p in ("up", "down")]
        pairs += [(mine.attention_norm, theirs.attention_norm)]
        pairs += [(mine.mlp_norm, theirs.mlp_norm)]
    with torch.no_grad():
        for mine, theirs in pairs:
            for name, parameter in mine.named_parameters(recurse=False):
                value = np.array(getattr(theirs, name), np.float32)
                parameter.copy_(torch.from_numpy(value))
    return out


def logits(
    model: Transformer, tokens: Int[np.ndarray, "batch seq"]
) -> Float[np.ndarray, "batch seq vocab"]:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).numpy()


def adam_step(
    model: Transformer,
    inputs: Int[np.ndarray, "batch seq"],
    targets: Int[np.ndarray, "batch seq"],
) -> Callable[[], float]:
    """One gradient + Adam update of the mean next-token cross-entropy of a batch,
    as a call (parameters and optimiser state carried from call to call).

    **Arguments:**

    - `model`: the PyTorch Transformer (trained in place).
    - `inputs`, `targets`: a batch of windows and the next token at every position.

    **Returns:**

    A function that takes one step and returns its loss.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x = torch.from_numpy(np.asarray(inputs, np.int64))
    t = torch.from_numpy(np.asarray(targets, np.int64)).flatten()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), t)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step
