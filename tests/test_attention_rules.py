"""FA, KP, WM and sign symmetry (uSF, frSF, brSF) through the Transformer's causal
attention, against the attention's backward pass written out by hand: every
projection's input receives `ḡ B` (its feedback in place of its weight), its weight
`ḡᵀ x`, and softmax and the causal mask backpropagate as usual. Float64, a batch of
sequences under `jax.vmap`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx

from .test_transformer import (
    BATCH,
    CONTEXT,
    FA_FAMILY,
    WIDTH,
    _close,
    _grad,
    _model,
    _tokens,
    _wrappers,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(4321)


def _feedback(layer, rule: str, key) -> np.ndarray:
    """`B` in the weight's layout (`x̄ = g B` for `y = x Wᵀ`), from the equations."""
    w = np.asarray(layer.weight)
    fan_in = w.shape[1]
    if rule in ("fa", "kp", "wm"):
        return np.asarray(layer.feedback)
    if rule == "usf":
        return np.sign(w) / np.sqrt(3 * fan_in)
    if rule == "frsf":
        return np.abs(np.asarray(layer.magnitude)) * np.sign(w)
    bound = 1 / np.sqrt(fan_in)  # brSF: |U(-1/√fan_in, 1/√fan_in)| sign(W) per call
    m = jax.random.uniform(key, w.shape, jnp.float64, minval=-bound, maxval=bound)
    return np.abs(np.asarray(m)) * np.sign(w)


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=-1, keepdims=True)


def _attention_reference(block, rule: str, key, h: np.ndarray, g: np.ndarray):
    """One sequence through `h + Attn(LN(h))` and back, the attention written out:
    each projection's input gets `ḡ B` (its feedback in place of `W`), its weight
    `ḡᵀ x`; softmax and the causal mask backpropagate as usual. Returns
    `(h̄, {projection: dW})`."""
    attention = block.attention
    names = ("query_proj", "key_proj", "value_proj", "output_proj")
    keys = dict(zip(names, jax.random.split(key, 4)))
    w = {n: np.asarray(getattr(attention, n).weight) for n in names}
    b = {n: _feedback(getattr(attention, n), rule, keys[n]) for n in names}
    n_, vjp_norm = jax.vjp(jax.vmap(block.attention_norm), jnp.asarray(h))
    n = np.asarray(n_)
    seq, heads = h.shape[0], attention.num_heads
    q, k, v = (n @ w[p].T for p in names[:3])
    d = q.shape[1] // heads
    causal = np.tril(np.ones((seq, seq), bool))
    a = np.zeros_like(q)
    probs = []
    for i in range(heads):
        c = slice(i * d, (i + 1) * d)
        s = np.where(causal, q[:, c] @ k[:, c].T / np.sqrt(d), -np.inf)
        probs.append(_softmax(s))
        a[:, c] = probs[-1] @ v[:, c]
    dw = {"output_proj": g.T @ a}
    a_bar = g @ b["output_proj"]
    q_bar, k_bar, v_bar = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for i, p in enumerate(probs):
        c = slice(i * d, (i + 1) * d)
        v_bar[:, c] = p.T @ a_bar[:, c]
        p_bar = a_bar[:, c] @ v[:, c].T
        s_bar = p * (p_bar - np.sum(p_bar * p, axis=-1, keepdims=True))
        q_bar[:, c] = s_bar @ k[:, c] / np.sqrt(d)
        k_bar[:, c] = s_bar.T @ q[:, c] / np.sqrt(d)
    n_bar = np.zeros_like(n)
    for name, bar in zip(names[:3], (q_bar, k_bar, v_bar)):
        dw[name] = bar.T @ n
        n_bar += bar @ b[name]
    (h_bar,) = vjp_norm(jnp.asarray(n_bar))  # the norm stays on backprop
    return g + np.asarray(h_bar), dw


@pytest.mark.parametrize("rule", FA_FAMILY)
def test_fa_family_through_attention_equals_the_equations(rule, getkey, rng):
    model = bfx.convert(_model(getkey()), rule, key=getkey())
    block = model.blocks[0]
    h = jnp.asarray(rng.standard_normal((BATCH, CONTEXT, WIDTH)))
    g = jnp.asarray(rng.standard_normal((BATCH, CONTEXT, WIDTH)))
    key = getkey()

    def sublayer(block, h):
        # One key for the whole batch, as brSF is used in training.
        return jax.vmap(lambda x: block.attention_sublayer(x, key=key))(h)

    _, vjp = eqx.filter_jit(lambda b, h: eqx.filter_vjp(sublayer, b, h))(block, h)
    block_grad, h_bar = vjp(g)
    expected_h_bar = np.zeros(h.shape)
    expected_dw = {}
    for i in range(BATCH):
        hb, dw = _attention_reference(
            block, rule, key, np.asarray(h[i]), np.asarray(g[i])
        )
        expected_h_bar[i] = hb
        for name, value in dw.items():
            expected_dw[name] = expected_dw.get(name, 0) + value
    np.testing.assert_allclose(h_bar, expected_h_bar, rtol=1e-9, atol=1e-12)
    for name, dw in expected_dw.items():
        got = getattr(block_grad.attention, name)
        np.testing.assert_allclose(got.weight, dw, rtol=1e-9, atol=1e-12)
        if rule == "kp":  # ΔB = ΔW
            np.testing.assert_allclose(got.feedback, dw, rtol=1e-9, atol=1e-12)
        elif rule in ("fa", "wm"):
            assert not np.any(np.asarray(got.feedback))
        elif rule == "frsf":
            assert not np.any(np.asarray(got.magnitude))


@pytest.mark.parametrize("rule", ["fa", "kp"])
def test_fa_with_feedback_equal_to_the_weights_is_backprop(rule, getkey, rng):
    model = bfx.convert(_model(getkey()), rule, key=getkey())
    wrappers = _wrappers(model)
    model = eqx.tree_at(
        lambda m: [w.feedback for w in _wrappers(m)],
        model,
        [w.weight for w in wrappers],
    )
    tokens, targets = _tokens(rng)
    fa = _grad(model, tokens, targets)
    bp = _grad(bfx.convert(model, "bp"), tokens, targets)
    _close(bfx.convert(fa, "bp"), bp)
