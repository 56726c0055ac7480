"""The decoder-only Transformer: causality, conversion to every rule, DFA's macro and
micro placements against Launay et al.'s equations (per-token error, `B` shared
across positions, the chain cut between blocks), and training steps compiled once
(FA / KP / WM / sign symmetry through attention: test_attention_rules.py).

Float64, tiny sizes, a batch of sequences under `jax.vmap`; loss = the summed
cross-entropy of every next-token prediction, so `e = softmax(y) - onehot(t)` per
token."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bioflax_eqx as bfx


VOCAB, CONTEXT, WIDTH, DEPTH, HEADS, BATCH = 7, 6, 8, 2, 2, 3
FA_FAMILY = ("fa", "kp", "wm", "usf", "frsf", "brsf")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _model(key, **kwargs) -> bfx.Transformer:
    return bfx.Transformer(VOCAB, CONTEXT, WIDTH, DEPTH, HEADS, key=key, **kwargs)


def _tokens(rng, batch=BATCH, seq=CONTEXT) -> tuple[jax.Array, jax.Array]:
    return (
        jnp.asarray(rng.integers(0, VOCAB, (batch, seq))),
        jnp.asarray(rng.integers(0, VOCAB, (batch, seq))),
    )


def _loss(model, tokens, targets, key=None):
    logits = jax.vmap(lambda x: model(x, key=key))(tokens)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


_grad = eqx.filter_jit(eqx.filter_grad(_loss))


def _close(a, b):
    leaves_a, def_a = jax.tree_util.tree_flatten(eqx.filter(a, eqx.is_array))
    leaves_b, def_b = jax.tree_util.tree_flatten(eqx.filter(b, eqx.is_array))
    assert def_a == def_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- forward, conversion


def test_causal_and_sized_by_its_constructor(getkey, rng):
    model = _model(getkey())
    assert (model.vocab_size, model.context, model.width, model.depth) == (
        VOCAB,
        CONTEXT,
        WIDTH,
        DEPTH,
    )
    assert model.dfa_placement is None and model.feedback == ()
    tokens = jnp.asarray(rng.integers(0, VOCAB, CONTEXT))
    y = eqx.filter_jit(model)(tokens)
    assert y.shape == (CONTEXT, VOCAB) and y.dtype == jnp.float64
    for t in range(CONTEXT):
        changed = tokens.at[t].set((tokens[t] + 1) % VOCAB)
        y_changed = eqx.filter_jit(model)(changed)
        # Changing token t never changes the outputs before t; it changes t's.
        np.testing.assert_array_equal(y_changed[:t], y[:t])
        assert not np.allclose(y_changed[t], y[t])
    # A shorter sequence is a prefix: the same outputs.
    np.testing.assert_allclose(model(tokens[:4]), y[:4], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="1 to 6"):
        model(jnp.zeros(CONTEXT + 1, int))


def _wrappers(model) -> list:
    leaves = jax.tree_util.tree_leaves(
        model, is_leaf=lambda x: isinstance(x, bfx.AbstractRule)
    )
    return [x for x in leaves if isinstance(x, bfx.AbstractRule)]


@pytest.mark.parametrize("rule", FA_FAMILY)
def test_convert_wraps_every_linear_map(rule, getkey, rng):
    model = _model(getkey())
    converted = bfx.convert(model, rule, key=getkey())
    # Per block the attention's four projections and the MLP's two, + the head.
    assert len(_wrappers(converted)) == 6 * DEPTH + 1
    block = converted.blocks[0]
    for proj in ("query_proj", "key_proj", "value_proj", "output_proj"):
        assert isinstance(getattr(block.attention, proj), bfx.AbstractRule)
    assert type(converted.embedding) is eqx.nn.Embedding
    assert type(block.attention_norm) is eqx.nn.LayerNorm
    tokens, _ = _tokens(rng)
    key = getkey()
    np.testing.assert_array_equal(
        jax.vmap(lambda x: converted(x, key=key))(tokens), jax.vmap(model)(tokens)
    )
    assert eqx.tree_equal(bfx.convert(converted, "bp"), model)


@pytest.mark.parametrize("placement", ["macro", "micro"])
def test_convert_to_dfa_and_back(placement, getkey, rng):
    model = _model(getkey())
    dfa = bfx.convert(model, "dfa", key=getkey(), placement=placement)
    assert dfa.dfa_placement == placement
    assert len(dfa.feedback) == DEPTH * (1 if placement == "macro" else 2)
    for point in dfa.feedback:
        assert point.feedback.shape == (WIDTH, VOCAB)  # shared across positions
    built = _model(getkey(), dfa_placement=placement)
    assert built.dfa_placement == placement
    tokens, _ = _tokens(rng)
    np.testing.assert_array_equal(jax.vmap(dfa)(tokens), jax.vmap(model)(tokens))
    # Converting to another rule removes the points; back to bp, bit for bit.
    fa = bfx.convert(dfa, "fa", key=getkey())
    assert fa.feedback == () and len(_wrappers(fa)) == 6 * DEPTH + 1
    assert eqx.tree_equal(bfx.convert(dfa, "bp"), model)
    assert eqx.tree_equal(dfa.with_dfa(None), model)


def test_errors_are_clear(getkey):
    model = _model(getkey())
    with pytest.raises(ValueError, match="needs `placement=`"):
        bfx.convert(model, "dfa", key=getkey())
    with pytest.raises(ValueError, match="`placement=` is for rule 'dfa'"):
        bfx.convert(model, "fa", key=getkey(), placement="macro")
    with pytest.raises(ValueError, match="models that place their own DFA points"):
        mlp = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
        bfx.convert(mlp, "dfa", key=getkey(), error_features=2, placement="macro")
    with pytest.raises(ValueError, match="`dfa_placement` must be None"):
        _model(getkey(), dfa_placement="mini")
    with pytest.raises(ValueError, match="needs `key=`"):
        model.with_dfa("macro")
    with pytest.raises(ValueError, match="must divide `width`"):
        bfx.Transformer(VOCAB, CONTEXT, 6, DEPTH, 4, key=getkey())
    with pytest.raises(ValueError, match="`depth` must be a positive integer"):
        bfx.Transformer(VOCAB, CONTEXT, WIDTH, 0, HEADS, key=getkey())


# ------------------------------------------------------------------ DFA's equations


def _units(model: bfx.Transformer, placement: str):
    """The units between feedback points, in order: `(block index, f(block, h))`."""
    units = []
    for i in range(model.depth):
        if placement == "macro":
            units.append((i, lambda b, h: b(h)))
        else:
            units.append((i, lambda b, h: b.attention_sublayer(h)))
            units.append((i, lambda b, h: b.mlp_sublayer(h)))
    return units


def _dfa_reference(model: bfx.Transformer, placement: str, tokens, targets):
    """One sequence's DFA gradients, from Launay et al.'s equations: the error
    `e = softmax(y) - onehot(t)` per token; unit `l` (a block, macro; a sub-layer,
    micro) receives `e Bₗᵀ` at its output, i.e. `Bₗ e_t` at each position `t`, and
    backprop runs inside it only; the head gets `e`; the embedding and positions get
    what the first unit sends back to its input."""
    units = _units(model, placement)
    feedback = [np.asarray(p.feedback) for p in model.feedback]
    assert len(feedback) == len(units)

    def embed(embedding, positions):
        return jax.vmap(embedding)(tokens) + positions

    acts = [embed(model.embedding, model.positions)]
    for i, f in units:
        acts.append(f(model.blocks[i], acts[-1]))

    def head(norm, head):
        return jax.vmap(lambda v: head(norm(v)))(acts[-1])

    y = head(model.norm, model.head)
    e = jax.nn.softmax(y, axis=-1) - jax.nn.one_hot(targets, VOCAB, dtype=y.dtype)
    # Per token, B shared across positions: row t is B e_t.
    cotangents = [e @ jnp.asarray(b).T for b in feedback]

    blocks: list = [None] * model.depth
    for (i, f), h, cotangent in zip(units, acts[:-1], cotangents):
        _, vjp = eqx.filter_vjp(lambda b: f(b, h), model.blocks[i])
        (g,) = vjp(cotangent)
        # Micro: a block's gradient is the sum of its two sub-layers'.
        blocks[i] = (
            g if blocks[i] is None else jax.tree_util.tree_map(jnp.add, blocks[i], g)
        )
    # The embedding: backprop through the first unit only, from its own B e.
    i, f = units[0]
    _, vjp = jax.vjp(lambda h: f(model.blocks[i], h), acts[0])
    (h0_bar,) = vjp(cotangents[0])
    _, vjp = eqx.filter_vjp(embed, model.embedding, model.positions)
    embedding, positions = vjp(h0_bar)
    _, vjp = eqx.filter_vjp(head, model.norm, model.head)
    norm, head_grad = vjp(e)
    return blocks, embedding, positions, norm, head_grad


@pytest.mark.parametrize("placement", ["macro", "micro"])
def test_dfa_gradients_equal_the_equations(placement, getkey, rng):
    model = _model(getkey(), dfa_placement=placement)
    tokens, targets = _tokens(rng)
    grads = _grad(model, tokens, targets)

    per_example = eqx.filter_vmap(
        lambda x, t: _dfa_reference(model, placement, x, t), in_axes=(0, 0)
    )
    reference = jax.tree_util.tree_map(
        lambda g: jnp.sum(g, axis=0), per_example(tokens, targets)
    )
    blocks, embedding, positions, norm, head = reference
    _close(list(grads.blocks), blocks)
    _close(grads.embedding, embedding)
    np.testing.assert_allclose(grads.positions, positions, rtol=1e-9, atol=1e-12)
    _close(grads.norm, norm)
    _close(grads.head, head)
    for point in grads.feedback:  # B never trains
        assert not np.any(np.asarray(point.feedback))

    # The chain is cut: backprop's gradients differ in every block but the last.
    bp = _grad(model.with_dfa(None), tokens, targets)
    _close(bp.head, head)
    assert not np.allclose(bp.blocks[0].up.weight, grads.blocks[0].up.weight)


def _count_dots(model) -> int:
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jnp.zeros((BATCH, CONTEXT), int)

    def grad(params, x):
        return jax.grad(lambda p: _loss(eqx.combine(p, static), x, x))(params)

    text = jax.jit(grad).lower(params, x).compile().as_text()
    assert text is not None
    return len(re.findall(r"\bdot\(", text))


def test_dfa_costs_backprops_products_and_one_per_point(getkey):
    # No discarded cotangent is computed (no product beyond backprop's but the
    # points' `e Bᵀ`), and none is saved: every block opens with a LayerNorm, whose
    # parameters learn from the cotangent through the q/k/v projections.
    model = _model(getkey())
    bp = _count_dots(model)
    for placement, points in (("macro", DEPTH), ("micro", 2 * DEPTH)):
        dfa = model.with_dfa(placement, key=getkey())
        assert _count_dots(dfa) == bp + points


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_alignment_metrics_of_every_linear_map(rule, getkey, rng):
    model = bfx.convert(
        _model(getkey()),
        rule,
        key=getkey(),
        placement="macro" if rule == "dfa" else None,
    )
    tokens, targets = _tokens(rng)

    def loss(y, t):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(y, t))

    metrics = bfx.alignment_metrics(model, tokens, targets, loss)
    angles = [metrics[f"delta_angle/{i}"] for i in range(6 * DEPTH + 1)]
    assert all(np.isfinite(float(a)) for a in angles)
    # The output projection's error signal is e under every rule: no angle.
    np.testing.assert_allclose(angles[-1], 0.0, atol=1e-5)
    assert float(angles[0]) > 1.0  # the first block's, degrees away from backprop's


def test_per_token_channel_in_a_hand_written_model(getkey, rng):
    # A point after a (seq, width) activation with a (seq, vocab) channel sends
    # e Bᵀ; a point whose B covers the whole (seq, width) needs a per-example
    # channel and is refused on a per-token one.
    point = bfx.DFAFeedback(WIDTH, VOCAB, key=getkey())
    h = jnp.asarray(rng.standard_normal((CONTEXT, WIDTH)))
    e = jnp.asarray(rng.standard_normal((CONTEXT, VOCAB)))

    def f(h):
        channel = bfx.open_error_channel(h, (CONTEXT, VOCAB))
        out, channel = point(h, channel)
        y = out @ jnp.ones((WIDTH, VOCAB))
        return bfx.close_error_channel(y, channel)

    _, vjp = jax.vjp(f, h)
    (h_bar,) = vjp(e)
    np.testing.assert_allclose(h_bar, e @ point.feedback.T, rtol=1e-12)
    whole = bfx.DFAFeedback((CONTEXT, WIDTH), VOCAB, key=getkey())
    with pytest.raises(ValueError, match="expects an activation of shape"):
        whole(h, bfx.open_error_channel(h, (CONTEXT, VOCAB)))
    with pytest.raises(ValueError, match="error channel of shape"):
        point(h, bfx.open_error_channel(h, (CONTEXT, VOCAB + 1)))


# ------------------------------------------------------------------------- training


@pytest.mark.parametrize("rule", ["dfa", "brsf"])
def test_steps_compile_once(rule, getkey, rng):
    model = _model(getkey())
    if rule == "dfa":
        model = bfx.convert(model, "dfa", key=getkey(), placement="micro")
    else:
        model = bfx.convert(model, rule, key=getkey())
    params, static = eqx.partition(model, bfx.trainable(model))
    optimizer = optax.sgd(0.01)
    opt_state = optimizer.init(params)
    traces = []

    @jax.jit
    def step(params, opt_state, tokens, targets, key):
        traces.append(None)
        grads = jax.grad(lambda p: _loss(eqx.combine(p, static), tokens, targets, key))(
            params
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    losses = []
    tokens, _ = _tokens(rng)
    for _ in range(3):
        # Predicting each token itself: learnable, so the loss must fall.
        params, opt_state = step(params, opt_state, tokens, tokens, getkey())
        losses.append(
            float(_loss(eqx.combine(params, static), tokens, tokens, getkey()))
        )
    assert len(traces) == 1
    assert losses[-1] < losses[0], losses
