"""Every rule's gradients against the papers' update equations, written by hand in
NumPy, for batches under `jax.vmap` and `eqx.filter_jit`, in float64.

Layout: the papers' feedback matrix `B` of a dense layer has the shape of `Wᵀ`; the
wrappers store it in the weight's layout, so the papers' `B` is `layer.feedback.T`
(FA, KP), and frSF's `magnitude` and brSF's per-call draw are in the weight's layout
too. DFA's `feedback` has shape `(in_features, error_features)`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx

from .helpers import layers_of, tree_allclose


SHAPES = [  # (in_size, out_size, width_size, depth, batch)
    (5, 3, 4, 1, 7),
    (3, 2, 6, 2, 4),
    (8, 4, 5, 3, 9),
]

# The array fields holding each rule's feedback (besides the wrapped layer).
FEEDBACK_FIELDS = {
    "bp": (),
    "fa": ("feedback",),
    "kp": ("feedback",),
    "wm": ("feedback",),
    "dfa": ("feedback",),
    "usf": (),
    "brsf": (),
    "frsf": ("magnitude",),
}

WRAPPERS = [bfx.FA, bfx.KP, bfx.USF, bfx.FRSF, bfx.BRSF]


def _tanh_prime(a):
    return 1 - np.tanh(a) ** 2


def _papers_feedback(layer, key) -> np.ndarray:
    """`B` of one layer as each paper defines it (shape of `Wᵀ` for the FA family,
    `(in, error)` for DFA), from the layer's fields and the equations alone."""
    if isinstance(layer, bfx.DFA):
        return np.asarray(layer.feedback)
    if isinstance(layer, eqx.nn.Linear):
        return np.asarray(layer.weight).T  # backprop
    w = np.asarray(layer.weight)
    fan_in = w.shape[1]
    if isinstance(layer, bfx.FA | bfx.KP | bfx.WM):
        return np.asarray(layer.feedback).T
    if isinstance(layer, bfx.USF):
        assert layer.scale == pytest.approx(1 / np.sqrt(3 * fan_in))
        return (layer.scale * np.sign(w)).T
    if isinstance(layer, bfx.FRSF):
        return (np.abs(np.asarray(layer.magnitude)) * np.sign(w)).T
    if isinstance(layer, bfx.BRSF):
        assert layer.scale == pytest.approx(1 / np.sqrt(fan_in))
        # Drawn in the weight's layout from the layer's key, then transposed.
        m = jax.random.uniform(
            key, w.shape, layer.weight.dtype, minval=-layer.scale, maxval=layer.scale
        )
        return (np.abs(np.asarray(m)) * np.sign(w)).T
    raise AssertionError(f"unexpected layer {type(layer).__name__}")


def reference_gradients(model: bfx.MLP, x, t, key):
    """The update of each rule for L = Σ_batch ½‖y − t‖², tanh hidden units:
    `(dW, db, {field: d field})` per layer, fields in their stored layout."""
    rule = model.rule
    assert rule is not None
    # The MLP splits its key into one per layer (brSF draws from it).
    keys = jax.random.split(key, len(model.layers))
    ws = [np.asarray(layer.weight) for layer in layers_of(model)]
    bs = [np.asarray(layer.bias) for layer in layers_of(model)]
    feedback = [_papers_feedback(layer, k) for layer, k in zip(model.layers, keys)]
    hs, pre = [np.asarray(x)], []
    for i, (w, b) in enumerate(zip(ws, bs)):
        a = hs[-1] @ w.T + b
        pre.append(a)
        hs.append(np.tanh(a) if i < len(ws) - 1 else a)
    e = hs[-1] - np.asarray(t)  # the output error, one row per example
    deltas = [e]
    for i in range(len(ws) - 2, -1, -1):
        if rule == "dfa":
            signal = e @ feedback[i + 1].T  # B_{l+1} e
        else:
            signal = deltas[0] @ feedback[i + 1].T  # B_{l+1} δ_{l+1}
        deltas.insert(0, _tanh_prime(pre[i]) * signal)
    grads = []
    for i, layer in enumerate(model.layers):
        gw = deltas[i].T @ hs[i]
        gb = deltas[i].sum(0)
        fields = {}
        for name in FEEDBACK_FIELDS[rule]:
            stored = np.asarray(getattr(layer, name))
            # KP: ΔB = ΔW in the papers' layout transposed, i.e. dW itself here.
            fields[name] = gw if rule == "kp" else np.zeros_like(stored)
        grads.append((gw, gb, fields))
    return grads


def _loss(model, x, t, key):
    y = jax.vmap(lambda xi: model(xi, key=key))(x)
    return 0.5 * jnp.sum((y - t) ** 2)


_grad = eqx.filter_jit(eqx.filter_grad(_loss))


@pytest.mark.parametrize("rule", bfx.RULES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_the_papers(rule, shape, getkey):
    in_size, out_size, width, depth, batch = shape
    model = bfx.MLP(
        in_size, out_size, width, depth, rule=rule, activation=jnp.tanh, key=getkey()
    )
    assert model.rule == rule
    x = jax.random.normal(getkey(), (batch, in_size))
    t = jax.random.normal(getkey(), (batch, out_size))
    key = getkey()
    grads = _grad(model, x, t, key)
    expected = reference_gradients(model, x, t, key)
    for layer_grad, (gw, gb, fields) in zip(grads.layers, expected):
        np.testing.assert_allclose(layer_grad.weight, gw, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer_grad.bias, gb, rtol=1e-10, atol=1e-12)
        for name, want in fields.items():
            got = getattr(layer_grad, name)
            assert got is not None, f"{rule}: `{name}` got no gradient"
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        # No other array receives a gradient (weight, bias, the feedback fields).
        assert len(jax.tree_util.tree_leaves(layer_grad)) == 2 + len(fields)
    if rule == "kp":  # ΔB = ΔW: the same layout, no transpose
        for layer_grad in grads.layers:
            assert tree_allclose(layer_grad.feedback, layer_grad.weight)


@pytest.mark.parametrize("cls", WRAPPERS)
def test_input_cotangent_is_feedback_times_error(cls, getkey):
    layer = cls(eqx.nn.Linear(6, 4, key=getkey()), key=getkey())
    assert layer.feedback.shape == layer.weight.shape == (4, 6)
    key = getkey()
    x = jax.random.normal(getkey(), (5, 6))
    g = jax.random.normal(getkey(), (5, 4))
    y, vjp = jax.vjp(jax.vmap(lambda xi: layer(xi, key=key)), x)
    # The forward is W x + b.
    assert tree_allclose(y, x @ layer.weight.T + layer.bias[None, :])
    (x_bar,) = vjp(g)
    # x̄ = B g per example, the papers' B (shape of Wᵀ) written out from the fields.
    expected = g @ _papers_feedback(layer, key).T
    assert tree_allclose(x_bar, expected)
    # ... which is the layer's own `feedback_weight` in the weight's layout.
    assert tree_allclose(x_bar, g @ layer.feedback_weight(key=key))
    assert not tree_allclose(x_bar, g @ layer.weight)  # not backprop's Wᵀg


def test_fa_with_feedback_equal_to_the_weights_is_backprop(getkey):
    model = bfx.MLP(6, 3, 5, 2, rule="fa", activation=jnp.tanh, key=getkey())
    # In the weight's layout, B = W is the papers' B = Wᵀ.
    model = eqx.tree_at(
        lambda m: [layer.feedback for layer in m.layers],
        model,
        [layer.weight for layer in layers_of(model)],
    )
    bp = bfx.convert(model, "bp")
    x = jax.random.normal(getkey(), (8, 6))
    t = jax.random.normal(getkey(), (8, 3))
    g_fa = _grad(model, x, t, None)
    g_bp = _grad(bp, x, t, None)
    for layer_fa, layer_bp in zip(g_fa.layers, g_bp.layers):
        assert tree_allclose(
            (layer_fa.weight, layer_fa.bias), (layer_bp.weight, layer_bp.bias)
        )


def test_dfa_of_depth_one_is_fa(getkey):
    dfa = bfx.MLP(6, 3, 5, 1, rule="dfa", activation=jnp.tanh, key=getkey())
    fa = bfx.convert(dfa, "fa", key=getkey())
    # The output layer's DFA feedback (5, 3) is FA's papers' B (shape of Wᵀ), so FA's
    # stored B (the weight's layout) is its transpose; the first one's is unused.
    dfa_out = dfa.layers[1]
    assert isinstance(dfa_out, bfx.DFA)
    assert dfa_out.feedback.shape == (5, 3)
    fa = eqx.tree_at(lambda m: m.layers[1].feedback, fa, dfa_out.feedback.T)  # pyright: ignore[reportAttributeAccessIssue]
    x = jax.random.normal(getkey(), (8, 6))
    t = jax.random.normal(getkey(), (8, 3))
    g_dfa, g_fa = _grad(dfa, x, t, None), _grad(fa, x, t, None)
    for a, b in zip(g_dfa.layers, g_fa.layers):
        assert tree_allclose((a.weight, a.bias), (b.weight, b.bias))


@pytest.mark.parametrize("rule", ["fa", "kp", "dfa", "brsf"])
def test_batch_gradient_is_sum_of_example_gradients(rule, getkey):
    # Each example must carry its own error: a channel shared across the batch would
    # hand every example the batch sum of errors instead.
    model = bfx.MLP(4, 3, 5, 3, rule=rule, activation=jnp.tanh, key=getkey())
    x = jax.random.normal(getkey(), (6, 4))
    t = jax.random.normal(getkey(), (6, 3))
    key = getkey()
    whole = _grad(model, x, t, key)
    parts = [_grad(model, x[i : i + 1], t[i : i + 1], key) for i in range(6)]
    summed = jax.tree_util.tree_map(lambda *leaves: sum(leaves), *parts)
    assert tree_allclose(whole, summed)


def test_no_retrace_on_second_call(getkey):
    traces = []

    @eqx.filter_jit
    def grad(model, x, t):
        traces.append(None)
        return eqx.filter_grad(_loss)(model, x, t, None)

    for rule in ("fa", "kp", "dfa", "usf", "frsf"):
        traces.clear()
        model = bfx.MLP(4, 3, 5, 2, rule=rule, key=getkey())
        for _ in range(3):
            x = jax.random.normal(getkey(), (6, 4))
            t = jax.random.normal(getkey(), (6, 3))
            model = eqx.apply_updates(model, grad(model, x, t))
        assert len(traces) == 1, rule


def test_brsf_draws_new_feedback_each_call(getkey):
    layer = bfx.BRSF(eqx.nn.Linear(6, 4, key=getkey()))
    k1, k2 = getkey(), getkey()
    b1 = layer.feedback_weight(key=k1)
    b2 = layer.feedback_weight(key=k2)
    assert b1.shape == layer.weight.shape
    assert not tree_allclose(b1, b2)
    assert tree_allclose(jnp.sign(b1), jnp.sign(layer.weight))
    # Bit for bit |jax.random.uniform(key, W.shape, ±scale)| * sign(W), compiled (as
    # in training; op by op, the last bit of the scaling may round differently).
    m = jax.random.uniform(
        k1, layer.weight.shape, layer.weight.dtype, -layer.scale, layer.scale
    )
    compiled = eqx.filter_jit(lambda layer, k: layer.feedback_weight(key=k))
    np.testing.assert_array_equal(
        compiled(layer, k1), jnp.abs(m) * jnp.sign(layer.weight)
    )
    np.testing.assert_allclose(b1, compiled(layer, k1), rtol=1e-14, atol=1e-16)
    # `feedback` is the expected value (scale / 2) sign(W).
    assert tree_allclose(layer.feedback, layer.scale / 2 * jnp.sign(layer.weight))
    with pytest.raises(ValueError, match="pass `key=`"):
        layer(jnp.zeros(6))


@pytest.mark.parametrize("rule", ["usf", "frsf", "brsf"])
def test_sign_feedback_follows_weight_sign(rule, getkey):
    model = bfx.MLP(4, 3, 5, 1, rule=rule, key=getkey())
    # (Through the wrapped layer: `weight` is a read-only property of the wrapper.)
    flipped = eqx.tree_at(
        lambda m: m.layers[0].layer.weight, model, -layers_of(model)[0].weight
    )
    key = getkey()
    layer, layer_flipped = model.layers[0], flipped.layers[0]
    assert isinstance(layer, bfx.AbstractRule)
    assert isinstance(layer_flipped, bfx.AbstractRule)
    b = layer.feedback_weight(key=key)
    b_flipped = layer_flipped.feedback_weight(key=key)
    assert tree_allclose(b_flipped, -b)
    assert tree_allclose(jnp.sign(b), jnp.sign(layer.weight))
