"""A decoder-only Transformer (a character-level language model), trainable by every
rule: the linear maps through `bfx.convert`, DFA through its own feedback points."""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._channel import close_error_channel, open_error_channel
from .._checks import check_positive_int
from .._convert import AbstractDFAModel
from .._dfa import DFAFeedback
from .._misc import default_floating_dtype


PLACEMENTS: tuple[str, ...] = ("macro", "micro")
# Feedback points per block for each placement.
_POINTS_PER_BLOCK = {"macro": 1, "micro": 2}


def _split(key: PRNGKeyArray | None, n: int) -> Sequence[PRNGKeyArray | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class RowLinear(eqx.nn.Linear):
    """An `eqx.nn.Linear` (same fields, same initialisation, same `W x + b` on one
    position) whose product is written `x Wᵀ`. Under `jax.vmap` over positions and
    sequences, `W x` compiles to one product laid out `(outputs, tokens)`, which XLA
    then transposes for its consumers; `x Wᵀ` lays it out `(tokens, outputs)`
    directly (the Adam step ~20 % faster on CPU, every rule alike: the rules call
    the layer they wrap, and its feedback copy, per position)."""

    # The base's own: a type checker would otherwise synthesise a dataclass one.
    __init__ = eqx.nn.Linear.__init__

    def __call__(
        self, x: Float[Array, " in_features"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " out_features"]:
        if "scalar" in (self.in_features, self.out_features):
            return eqx.nn.Linear.__call__(self, x, key=key)
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


def _rows(linear: eqx.nn.Linear) -> RowLinear:
    """`linear` as a `RowLinear`, with its weight and bias."""
    row = RowLinear(
        linear.in_features,
        linear.out_features,
        linear.use_bias,
        linear.weight.dtype,
        key=jax.random.key(0),  # its draw is replaced
    )
    return eqx.tree_at(
        lambda m: (m.weight, m.bias),
        row,
        (linear.weight, linear.bias),
        is_leaf=lambda x: x is None,
    )


def _projections(attention: eqx.nn.MultiheadAttention) -> tuple:
    return (
        attention.query_proj,
        attention.key_proj,
        attention.value_proj,
        attention.output_proj,
    )


def _per_position(
    layer, x: Float[Array, "seq inputs"], key: PRNGKeyArray | None
) -> Float[Array, "seq outputs"]:
    # One key for every position: a rule that draws feedback on each call (brSF)
    # then draws once per call, as under `jax.vmap` over a batch.
    return jax.vmap(lambda xi: layer(xi, key=key))(x)


class TransformerBlock(eqx.Module):
    """One pre-norm block of a decoder-only Transformer, on one sequence:

    $$u = h + \\mathrm{Attn}(\\mathrm{LN}_1(h)), \\qquad
    h' = u + W_2 \\, \\mathrm{gelu}(W_1 \\mathrm{LN}_2(u) + b_1) + b_2,$$

    with causal multi-head self-attention held in an `eqx.nn.MultiheadAttention`
    (its four projections are what `bfx.convert` wraps) and an MLP of 4× the width.
    """

    attention_norm: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    mlp_norm: eqx.nn.LayerNorm
    up: RowLinear
    down: RowLinear

    def __init__(self, width: int, heads: int, dtype=None, *, key: PRNGKeyArray):
        """**Arguments:**

        - `width`: the residual stream's width.
        - `heads`: attention heads; must divide `width`.
        - `dtype`: the parameters' dtype; defaults to JAX's default float.
        - `key`: a `jax.random.PRNGKey`.
        """
        k_attention, k_up, k_down = jax.random.split(key, 3)
        self.attention_norm = eqx.nn.LayerNorm(width, dtype=dtype)
        attention = eqx.nn.MultiheadAttention(
            heads, width, dtype=dtype, key=k_attention
        )
        self.attention = eqx.tree_at(
            _projections, attention, tuple(map(_rows, _projections(attention)))
        )
        self.mlp_norm = eqx.nn.LayerNorm(width, dtype=dtype)
        self.up = RowLinear(width, 4 * width, dtype=dtype, key=k_up)
        self.down = RowLinear(4 * width, width, dtype=dtype, key=k_down)

    def attention_sublayer(
        self, h: Float[Array, "seq width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq width"]:
        """`h + Attn(LN₁(h))`, position `t` attending to positions `≤ t`."""
        attention = self.attention
        k_query, k_key, k_value, k_output = _split(key, 4)
        n = jax.vmap(self.attention_norm)(h)
        seq, heads = h.shape[0], attention.num_heads
        # The projections are called here, not through `MultiheadAttention.__call__`,
        # so that each gets a key (brSF draws its feedback from it).
        q = _per_position(attention.query_proj, n, k_query).reshape(seq, heads, -1)
        k = _per_position(attention.key_proj, n, k_key).reshape(seq, heads, -1)
        v = _per_position(attention.value_proj, n, k_value).reshape(seq, heads, -1)
        scores = jnp.einsum("shd,thd->hst", q, k) / math.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        mixed = jnp.einsum("hst,thd->shd", weights, v).reshape(seq, -1)
        return h + _per_position(attention.output_proj, mixed, k_output)

    def mlp_sublayer(
        self, u: Float[Array, "seq width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq width"]:
        """`u + W₂ gelu(W₁ LN₂(u) + b₁) + b₂`, position by position."""
        k_up, k_down = _split(key, 2)
        n = jax.vmap(self.mlp_norm)(u)
        hidden = jax.nn.gelu(_per_position(self.up, n, k_up))
        return u + _per_position(self.down, hidden, k_down)

    def __call__(
        self, h: Float[Array, "seq width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq width"]:
        k_attention, k_mlp = _split(key, 2)
        return self.mlp_sublayer(self.attention_sublayer(h, key=k_attention), key=k_mlp)


class Transformer(AbstractDFAModel):
    """A decoder-only Transformer language model (GPT-style, pre-norm), on one
    sequence of token ids:

    $$h_0 = E[x] + P, \\qquad h_l = \\mathrm{Block}_l(h_{l-1}), \\qquad
    y = W_{\\mathrm{out}} \\mathrm{LN}(h_L) + b_{\\mathrm{out}},$$

    `E` the token embedding, `P` learned positions, each block a pre-norm
    `TransformerBlock` (causal multi-head self-attention, then an MLP of 4× the
    width, each with a residual add, `LN` a LayerNorm), and `y`
    the next-token logits at every position. A plain Equinox model:
    `bfx.convert(model, rule, key=...)` wraps every linear map (the attention's four
    projections, the MLPs, the output projection; each an `eqx.nn.Linear` computing
    `x Wᵀ + b` per position, `RowLinear`) for FA, KP, WM, uSF, brSF and frSF; the
    embedding, positions and norms stay on backprop.

    **DFA** (Launay et al. 2020). `dfa_placement="macro"` puts one
    [`bioflax_eqx.DFAFeedback`][] point after each block's residual output;
    `"micro"` one after the attention sub-layer's residual add and one after the
    MLP sub-layer's. The output error is per token, $e = \\partial L / \\partial y$
    of shape `(seq, vocab)`; each point holds $B$ of shape `(width, vocab)`, shared
    across positions, so the activation $a$ it follows (shape `(seq, width)`)
    receives

    $$\\bar a_t = B e_t, \\qquad \\bar a = e B^\\top,$$

    and whatever cotangent comes back from later layers, residual stream included,
    is discarded: no cotangent flows between blocks (macro) or sub-layers (micro)
    except what the points inject, and inside each, ordinary backprop turns $B e$
    into its gradients. The final norm and output projection learn from $e$ itself;
    the embedding and positions, before the first point, learn from what the first
    block (macro) or attention sub-layer (micro) sends back to its input. Convert
    an existing model with `bfx.convert(model, "dfa", key=..., placement=...)` or
    `model.with_dfa(placement, key=...)`:

    ```python
    model = bfx.Transformer(vocab_size=85, key=jax.random.key(0))  # 4 × 128, 4 heads
    fa = bfx.convert(model, "fa", key=jax.random.key(1))
    dfa = bfx.convert(model, "dfa", key=jax.random.key(1), placement="micro")
    logits = jax.vmap(dfa)(tokens)  # tokens: (batch, seq ≤ 128) ids
    ```
    """

    embedding: eqx.nn.Embedding
    positions: Float[Array, "context width"]
    blocks: tuple[TransformerBlock, ...]
    norm: eqx.nn.LayerNorm
    head: RowLinear
    # DFA's points, in call order; empty for every other rule.
    feedback: tuple[DFAFeedback, ...]

    def __init__(
        self,
        vocab_size: int,
        context: int = 128,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        dtype=None,
        *,
        dfa_placement: str | None = None,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `vocab_size`: the number of token ids (the output size).
        - `context`: the longest sequence it takes (the learned positions).
        - `width`: the residual stream's width.
        - `depth`: the number of blocks.
        - `heads`: attention heads per block; must divide `width`.
        - `dtype`: the parameters' dtype; defaults to JAX's default float.
        - `dfa_placement`: `None` (no DFA points), `"macro"` or `"micro"`.
        - `feedback_scale`: DFA's `B ~ U(-s/√width, s/√width)`, `s =
            feedback_scale`.
        - `key`: a `jax.random.PRNGKey`.
        """
        check_positive_int(
            vocab_size=vocab_size, context=context, width=width, depth=depth
        )
        check_positive_int(heads=heads)
        if width % heads:
            raise ValueError(f"`heads` ({heads}) must divide `width` ({width}).")
        dtype = default_floating_dtype() if dtype is None else dtype
        k_embed, k_pos, k_head, k_dfa, *k_blocks = jax.random.split(key, 4 + depth)
        # GPT-2's initialisation of both tables: N(0, 0.02²).
        embed = 0.02 * jax.random.normal(k_embed, (vocab_size, width), dtype)
        self.embedding = eqx.nn.Embedding(weight=embed)
        self.positions = 0.02 * jax.random.normal(k_pos, (context, width), dtype)
        self.blocks = tuple(
            TransformerBlock(width, heads, dtype, key=k) for k in k_blocks
        )
        self.norm = eqx.nn.LayerNorm(width, dtype=dtype)
        self.head = RowLinear(width, vocab_size, dtype=dtype, key=k_head)
        self.feedback = self._points(dfa_placement, feedback_scale, k_dfa)

    def __check_init__(self):
        counts = {0: None} | {
            n * len(self.blocks): p for p, n in _POINTS_PER_BLOCK.items()
        }
        if len(self.feedback) not in counts:
            raise ValueError(
                f"a Transformer of depth {len(self.blocks)} has 0, "
                f"{len(self.blocks)} (macro) or {2 * len(self.blocks)} (micro) DFA "
                f"points, got {len(self.feedback)}."
            )
        shape = (self.width,)
        for point in self.feedback:
            if point.shape != shape or point.error_features != self.vocab_size:
                raise ValueError(
                    f"each DFA point must have `feedback` of shape "
                    f"{(*shape, self.vocab_size)} (width, vocab), got "
                    f"{point.feedback.shape}."
                )

    def _points(
        self, placement: str | None, feedback_scale: float, key: PRNGKeyArray | None
    ) -> tuple[DFAFeedback, ...]:
        if placement is None:
            return ()
        if placement not in PLACEMENTS:
            raise ValueError(
                f"`dfa_placement` must be None, 'macro' or 'micro', got {placement!r}."
            )
        if key is None:
            raise ValueError("drawing DFA feedback needs `key=`.")
        n = _POINTS_PER_BLOCK[placement] * self.depth
        return tuple(
            DFAFeedback(
                self.width,
                self.vocab_size,
                self.positions.dtype,
                feedback_scale=feedback_scale,
                key=k,
            )
            for k in jax.random.split(key, n)
        )

    @property
    def vocab_size(self) -> int:
        # Read off the embedding: `head` may be wrapped by a rule.
        return self.embedding.weight.shape[0]

    @property
    def context(self) -> int:
        return self.positions.shape[0]

    @property
    def width(self) -> int:
        return self.positions.shape[1]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def dfa_placement(self) -> str | None:
        """`"macro"`, `"micro"`, or `None` without DFA points."""
        per_block = len(self.feedback) // self.depth
        return {1: "macro", 2: "micro"}.get(per_block)

    def with_dfa(
        self,
        placement: str | None,
        *,
        key: PRNGKeyArray | None = None,
        feedback_scale: float = 1.0,
    ) -> "Transformer":
        """This model with fresh DFA points at `placement` (`"macro"` or `"micro"`),
        or with none (`None`); every other parameter is kept.

        **Arguments:**

        - `placement`: `"macro"`, `"micro"` or `None`.
        - `key`: draws the points' `B`; needed unless `placement` is `None`.
        - `feedback_scale`: `B ~ U(-s/√width, s/√width)`, `s = feedback_scale`.

        **Returns:**

        The model with its `feedback` replaced.
        """
        points = self._points(placement, feedback_scale, key)
        return eqx.tree_at(lambda m: m.feedback, self, points)

    def __call__(
        self, tokens: Int[Array, " seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq vocab"]:
        """**Arguments:**

        - `tokens`: one sequence of token ids, of length `seq ≤ context`.
        - `key`: split between the layers; only rules that draw feedback on every
            call (brSF) need it.

        **Returns:**

        The logits of the next token at every position, shape `(seq, vocab_size)`.
        Position `t` depends on `tokens[: t + 1]` only.
        """
        seq = tokens.shape[0]
        if not 0 < seq <= self.context:
            raise ValueError(
                f"`tokens` must hold 1 to {self.context} (context) ids, got {seq}."
            )
        *k_blocks, k_head = _split(key, self.depth + 1)
        h = jax.vmap(self.embedding)(tokens) + self.positions[:seq]
        dfa = bool(self.feedback)
        # The per-token error channel, `(seq, vocab)` (see `bfx.open_error_channel`;
        # unused, and compiled away, without DFA).
        channel = open_error_channel(tokens, (seq, self.vocab_size), h.dtype)
        points = iter(self.feedback)
        micro = self.dfa_placement == "micro"
        for block, k in zip(self.blocks, k_blocks):
            k_attention, k_mlp = _split(k, 2)
            h = block.attention_sublayer(h, key=k_attention)
            if micro:
                h, channel = next(points)(h, channel)
            h = block.mlp_sublayer(h, key=k_mlp)
            if dfa:
                h, channel = next(points)(h, channel)
        y = _per_position(lambda v, key: self.head(self.norm(v), key=key), h, k_head)
        return close_error_channel(y, channel) if dfa else y
