"""Every rule's gradients against the papers' update equations, written by hand in
NumPy, for batches under `jax.vmap` and `eqx.filter_jit`, in float64."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx

from .helpers import tree_allclose


SHAPES = [  # (in_size, out_size, width_size, depth, batch)
    (5, 3, 4, 1, 7),
    (3, 2, 6, 2, 4),
    (8, 4, 5, 3, 9),
]


def _tanh_prime(a):
    return 1 - np.tanh(a) ** 2


def _feedback_matrices(model: bfx.MLP, key) -> list[np.ndarray]:
    """`B` of every layer as each paper defines it, from the layer's fields."""
    keys = jax.random.split(key, len(model.layers))
    out = []
    for layer, k in zip(model.layers, keys):
        w = np.asarray(layer.weight)
        if isinstance(layer, bfx.FALinear | bfx.KPLinear | bfx.DFALinear):
            out.append(np.asarray(layer.feedback))
        elif isinstance(layer, bfx.USFLinear):
            out.append(layer.scale * np.sign(w).T)
        elif isinstance(layer, bfx.FRSFLinear):
            out.append(np.abs(np.asarray(layer.magnitude)) * np.sign(w).T)
        elif isinstance(layer, bfx.BRSFLinear):
            # Drawn in the weight's layout, then transposed.
            m = jax.random.uniform(
                k, w.shape, w.dtype, minval=-layer.scale, maxval=layer.scale
            ).T
            out.append(np.abs(np.asarray(m)) * np.sign(w).T)
        else:
            out.append(w.T)  # backprop
    return out


def reference_gradients(model: bfx.MLP, x, t, key):
    """The update of each rule for L = Σ_batch ½‖y − t‖², tanh hidden units."""
    rule = model.rule
    ws = [np.asarray(layer.weight) for layer in model.layers]
    bs = [np.asarray(layer.bias) for layer in model.layers]
    feedback = _feedback_matrices(model, key)
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
    for i in range(len(ws)):
        gw = deltas[i].T @ hs[i]
        gb = deltas[i].sum(0)
        gfb = gw.T if rule == "kp" else np.zeros_like(feedback[i])
        grads.append((gw, gb, gfb))
    return grads


def _loss(model, x, t, key):
    y = jax.vmap(lambda xi: model(xi, key=key))(x)
    return 0.5 * jnp.sum((y - t) ** 2)


_grad = eqx.filter_jit(eqx.filter_grad(_loss))


def _feedback_grad(layer_grad):
    for name in ("feedback", "magnitude"):
        value = layer_grad.__dict__.get(name)
        if value is not None:
            return np.asarray(value)
    return None


@pytest.mark.parametrize("rule", bfx.RULES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_the_papers(rule, shape, getkey):
    in_size, out_size, width, depth, batch = shape
    model = bfx.MLP(
        in_size, out_size, width, depth, rule=rule, activation=jnp.tanh, key=getkey()
    )
    x = jax.random.normal(getkey(), (batch, in_size))
    t = jax.random.normal(getkey(), (batch, out_size))
    key = getkey()
    grads = _grad(model, x, t, key)
    expected = reference_gradients(model, x, t, key)
    for layer_grad, (gw, gb, gfb) in zip(grads.layers, expected):
        np.testing.assert_allclose(layer_grad.weight, gw, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer_grad.bias, gb, rtol=1e-10, atol=1e-12)
        got_fb = _feedback_grad(layer_grad)
        if got_fb is not None:  # layers with a stored feedback array
            np.testing.assert_allclose(got_fb, gfb, rtol=1e-10, atol=1e-12)
        elif rule == "kp":
            pytest.fail("Kolen-Pollack feedback got no gradient")


@pytest.mark.parametrize(
    "cls", [bfx.FALinear, bfx.KPLinear, bfx.USFLinear, bfx.FRSFLinear, bfx.BRSFLinear]
)
def test_input_cotangent_is_feedback_times_error(cls, getkey):
    layer = cls(6, 4, key=getkey())
    key = getkey()
    x = jax.random.normal(getkey(), (5, 6))
    g = jax.random.normal(getkey(), (5, 4))
    _, vjp = jax.vjp(jax.vmap(lambda xi: layer(xi, key=key)), x)
    (x_bar,) = vjp(g)
    expected = g @ layer.feedback_matrix(key=key).T
    assert tree_allclose(x_bar, expected)
    assert not tree_allclose(x_bar, g @ layer.weight)  # not backprop's Wᵀg


def test_fa_with_transposed_weights_is_backprop(getkey):
    model = bfx.MLP(6, 3, 5, 2, rule="fa", activation=jnp.tanh, key=getkey())
    model = eqx.tree_at(
        lambda m: [layer.feedback for layer in m.layers],
        model,
        [layer.weight.T for layer in model.layers],
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
    # The output layer's DFA feedback (5, 3) has FA's shape; the first one's is unused.
    dfa_out = dfa.layers[1]
    assert isinstance(dfa_out, bfx.DFALinear)
    fa = eqx.tree_at(lambda m: m.layers[1].feedback, fa, dfa_out.feedback)  # pyright: ignore[reportAttributeAccessIssue]
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

    for rule in ("fa", "kp", "dfa"):
        traces.clear()
        model = bfx.MLP(4, 3, 5, 2, rule=rule, key=getkey())
        for _ in range(3):
            x = jax.random.normal(getkey(), (6, 4))
            t = jax.random.normal(getkey(), (6, 3))
            model = eqx.apply_updates(model, grad(model, x, t))
        assert len(traces) == 1, rule


def test_brsf_draws_new_feedback_each_call(getkey):
    layer = bfx.BRSFLinear(6, 4, key=getkey())
    b1 = layer.feedback_matrix(key=getkey())
    b2 = layer.feedback_matrix(key=getkey())
    assert not tree_allclose(b1, b2)
    assert tree_allclose(jnp.sign(b1), jnp.sign(layer.weight.T))
    with pytest.raises(ValueError, match="pass `key=`"):
        layer(jnp.zeros(6))


@pytest.mark.parametrize("rule", ["usf", "frsf", "brsf"])
def test_sign_feedback_follows_weight_sign(rule, getkey):
    model = bfx.MLP(4, 3, 5, 1, rule=rule, key=getkey())
    flipped = eqx.tree_at(lambda m: m.layers[0].weight, model, -model.layers[0].weight)
    key = getkey()
    layer, layer_flipped = model.layers[0], flipped.layers[0]
    assert isinstance(layer, bfx.AbstractFeedbackLinear)
    assert isinstance(layer_flipped, bfx.AbstractFeedbackLinear)
    b = layer.feedback_matrix(key=key)
    b_flipped = layer_flipped.feedback_matrix(key=key)
    assert tree_allclose(b_flipped, -b)
