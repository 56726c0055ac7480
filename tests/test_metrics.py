"""Alignment metrics on cases whose answer is known: identical, opposite and
orthogonal directions, feedback equal to Wᵀ, backprop against itself, the expected
angles of sign symmetry, and every rule's δ against a NumPy reference."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx

from .helpers import layers_of


def _half_squared_error(y, t):
    return 0.5 * jnp.sum((y - t) ** 2)


# Compiled: op by op, every small operation would compile on its own (slow on CPU).
angle = eqx.filter_jit(bfx.angle)
weight_alignment = eqx.filter_jit(bfx.weight_alignment)
alignment_metrics = eqx.filter_jit(bfx.alignment_metrics)
layer_deltas = eqx.filter_jit(bfx.layer_deltas)


def _batch(getkey):
    """9 examples for the 5-input, 3-output models used throughout."""
    return jax.random.normal(getkey(), (9, 5)), jax.random.normal(getkey(), (9, 3))


def _orthogonalise(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """`b` minus its projection onto `a` (NumPy: eager JAX compiles every op)."""
    return b - np.vdot(a, b) / np.vdot(a, a) * a


def test_angle_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 6))
    assert float(angle(a, a)) == 0.0
    assert float(angle(a, 3.5 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(angle(a, -a)) == pytest.approx(180.0, abs=1e-6)
    orthogonal = _orthogonalise(rng.normal(size=(4, 6)), a)
    assert float(angle(a, orthogonal)) == pytest.approx(90.0, abs=1e-9)
    e1, e2 = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    assert float(angle(e1, e2)) == pytest.approx(45.0, abs=1e-9)
    # Accurate where arccos of a rounded cosine is not: a 1e-9 rad angle.
    tiny = np.array([1.0, 1e-9])
    assert float(angle(e1, tiny)) == pytest.approx(math.degrees(1e-9), rel=1e-6)
    # Pytrees are flattened into one vector.
    assert float(angle([e1, e1], [e1, -e1])) == pytest.approx(90.0, abs=1e-9)
    assert math.isnan(float(angle(e1, np.zeros(2))))
    with pytest.raises(ValueError, match="same shapes"):
        angle(e1, np.ones(3))


def test_weight_alignment_of_transposed_and_orthogonal_feedback(getkey):
    model = bfx.MLP(5, 3, 8, 2, rule="fa", key=getkey())
    weights = [np.asarray(layer.weight) for layer in layers_of(model)]
    feedback = [
        np.asarray(layer.feedback)
        for layer in model.layers
        if isinstance(layer, bfx.FA)
    ]
    assert [b.shape for b in feedback] == [w.shape for w in weights]
    # `feedback` is stored in the weight's layout: B = W is the papers' B = Wᵀ.
    same = eqx.tree_at(
        lambda m: [layer.feedback for layer in m.layers],
        model,
        [jnp.asarray(w) for w in weights],
    )
    metrics = weight_alignment(same)
    for i in range(3):
        assert float(metrics[f"weight_angle/{i}"]) == pytest.approx(0.0, abs=1e-12)
        assert float(metrics[f"feedback_norm_ratio/{i}"]) == pytest.approx(1.0)

    ortho = eqx.tree_at(
        lambda m: [layer.feedback for layer in m.layers],
        model,
        [jnp.asarray(_orthogonalise(b, w)) for w, b in zip(weights, feedback)],
    )
    metrics = weight_alignment(ortho)
    for i in range(3):
        assert float(metrics[f"weight_angle/{i}"]) == pytest.approx(90.0, abs=1e-9)


def _papers_feedback_in_weight_layout(layer, key) -> np.ndarray:
    """`B` of one FA-family layer from its fields and the equations, stored like
    `W` (the papers' `B` is its transpose). brSF: the draw of `key`, or with
    `key=None` its expected value `(scale / 2) sign(W)`."""
    w = np.asarray(layer.weight)
    if isinstance(layer, bfx.FA | bfx.KP | bfx.WM):
        return np.asarray(layer.feedback)
    if isinstance(layer, bfx.USF):
        return layer.scale * np.sign(w)
    if isinstance(layer, bfx.FRSF):
        return np.abs(np.asarray(layer.magnitude)) * np.sign(w)
    if isinstance(layer, bfx.BRSF):
        if key is None:
            return layer.scale / 2 * np.sign(w)
        m = jax.random.uniform(
            key, w.shape, layer.weight.dtype, minval=-layer.scale, maxval=layer.scale
        )
        return np.abs(np.asarray(m)) * np.sign(w)
    raise AssertionError(type(layer).__name__)


@pytest.mark.parametrize("rule", ["fa", "kp", "usf", "frsf", "brsf"])
def test_weight_alignment_against_numpy(rule, getkey):
    model = bfx.MLP(5, 3, 8, 2, rule=rule, key=getkey())
    metrics = weight_alignment(model)
    assert len(metrics) == 2 * len(model.layers)
    for i, layer in enumerate(layers_of(model)):
        w = np.asarray(layer.weight)
        b = _papers_feedback_in_weight_layout(layer, None)
        cos = np.vdot(w, b) / (np.linalg.norm(w) * np.linalg.norm(b))
        assert float(metrics[f"weight_angle/{i}"]) == pytest.approx(
            math.degrees(math.acos(cos)), abs=1e-9
        )
        assert float(metrics[f"feedback_norm_ratio/{i}"]) == pytest.approx(
            np.linalg.norm(b) / np.linalg.norm(w), rel=1e-12
        )


@pytest.mark.parametrize(
    "rule, expected",
    [
        # cos = E|w| / sqrt(E w²) = √3/2 for w ~ U(-k, k): 30°.
        ("usf", 30.0),
        ("brsf", 30.0),  # its expected feedback is uSF's up to scale
        # cos = E|w| E|m| / sqrt(E w² E m²) = 3/4 for independent w, m ~ U(-k, k).
        ("frsf", math.degrees(math.acos(0.75))),
        ("fa", 90.0),  # independent draws
    ],
)
def test_weight_angle_of_each_rule_at_initialisation(rule, expected, getkey):
    layer = bfx.MLP(300, 200, 8, 0, rule=rule, key=getkey()).layers[0]
    angle = float(weight_alignment(layer)["weight_angle/0"])
    assert angle == pytest.approx(expected, abs=0.6)


def test_backprop_against_itself_is_zero(getkey):
    model = bfx.MLP(5, 3, 8, 2, rule="bp", activation=jnp.tanh, key=getkey())
    x, t = _batch(getkey)
    metrics = alignment_metrics(model, x, t, _half_squared_error)
    for name, value in metrics.items():
        if "angle" in name:
            assert float(value) == 0.0, name
        else:
            assert float(value) == pytest.approx(1.0, abs=1e-12), name
    assert len(metrics) == 2 * 4 + 4  # angle and ratio per layer + global, δ angles
    assert bfx.weight_alignment(model) == {}  # no feedback matrices


def test_fa_with_transposed_feedback_matches_backprop(getkey):
    model = bfx.MLP(5, 3, 8, 2, rule="fa", activation=jnp.tanh, key=getkey())
    model = eqx.tree_at(
        lambda m: [layer.feedback for layer in m.layers],
        model,
        [layer.weight for layer in layers_of(model)],  # the papers' B = Wᵀ
    )
    x, t = _batch(getkey)
    metrics = alignment_metrics(model, x, t, _half_squared_error)
    for name, value in metrics.items():
        expected = 0.0 if "angle" in name else 1.0
        assert float(value) == pytest.approx(expected, abs=1e-6), name
    # The three parts, each on its own (in one compiled call).
    parts = eqx.filter_jit(
        lambda model, x, t: {
            **bfx.gradient_alignment(model, x, t, _half_squared_error),
            **bfx.delta_alignment(model, x, t, _half_squared_error),
            **bfx.weight_alignment(model),
        }
    )(model, x, t)
    assert parts.keys() == metrics.keys()
    for name in parts:
        assert float(parts[name]) == pytest.approx(float(metrics[name]), abs=1e-9)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_random_feedback_is_misaligned_except_at_the_output(rule, getkey):
    model = bfx.MLP(5, 3, 8, 2, rule=rule, activation=jnp.tanh, key=getkey())
    x, t = _batch(getkey)
    metrics = alignment_metrics(model, x, t, _half_squared_error)
    assert float(metrics["grad_angle/2"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["delta_angle/2"]) == pytest.approx(0.0, abs=1e-6)
    for i in (0, 1):
        assert 20.0 < float(metrics[f"delta_angle/{i}"]) < 160.0
        assert 20.0 < float(metrics[f"grad_angle/{i}"]) < 160.0
    # DFA's feedback maps the output error, not a layer's output: no weight angle.
    assert ("weight_angle/0" in metrics) == (rule == "fa")


def _reference_deltas(model: bfx.MLP, x, t, key) -> list[np.ndarray]:
    """Each layer's per-example error for ½‖y − t‖² and tanh hidden units, as the
    papers define it: B_{l+1} δ_{l+1} (FA family), B_{l+1} e (DFA), Wᵀ (backprop).
    With `B` stored like `W`, B_{l+1} δ is `δ @ B_stored` per row."""
    keys = jax.random.split(key, len(model.layers))  # the MLP's split, per layer
    hs, pre = [np.asarray(x)], []
    for i, layer in enumerate(layers_of(model)):
        a = hs[-1] @ np.asarray(layer.weight).T + np.asarray(layer.bias)
        pre.append(a)
        hs.append(np.tanh(a) if i < len(model.layers) - 1 else a)
    e = hs[-1] - np.asarray(t)
    deltas = [e]
    for i in range(len(model.layers) - 2, -1, -1):
        above, k = layers_of(model)[i + 1], keys[i + 1]
        if isinstance(above, bfx.DFA):
            signal = e @ np.asarray(above.feedback).T  # feedback: (in, error)
        elif isinstance(above, bfx.AbstractRule):
            signal = deltas[0] @ _papers_feedback_in_weight_layout(above, k)
        else:
            signal = deltas[0] @ np.asarray(above.weight)
        deltas.insert(0, (1 - np.tanh(pre[i]) ** 2) * signal)
    return deltas


# Every rule (brSF with its key, DFA's error channel); test_rules.py checks every
# rule's gradients.
@pytest.mark.parametrize("rule", bfx.RULES)
def test_layer_deltas_match_the_papers(rule, getkey):
    model = bfx.MLP(5, 3, 8, 2, rule=rule, activation=jnp.tanh, key=getkey())
    x, t = _batch(getkey)
    key = getkey()
    deltas = layer_deltas(model, x, t, _half_squared_error, key=key)
    expected = _reference_deltas(model, x, t, key)
    assert [d.shape for d in deltas] == [(9, 8), (9, 8), (9, 3)]
    for got, want in zip(deltas, expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_metrics_of_any_equinox_model(getkey):
    # Dense layers are found anywhere in the pytree, bias-free ones included.
    model = eqx.nn.MLP(5, 3, 8, 1, use_bias=False, use_final_bias=False, key=getkey())
    fa = bfx.convert(model, "fa", key=getkey())
    x, t = _batch(getkey)
    metrics = eqx.filter_jit(bfx.alignment_metrics)(fa, x, t, _half_squared_error)
    assert float(metrics["grad_angle/1"]) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < float(metrics["grad_angle/0"]) < 180.0
    assert {"weight_angle/0", "weight_angle/1", "delta_angle/global"} <= set(metrics)


def _conv_net(getkey):
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(2, 3, 3, padding=1, key=getkey()),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Conv2d(3, 4, 3, stride=2, key=getkey()),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(4 * 3 * 3, 5, key=getkey()),
        ]
    )


def _squared(y, t):
    return 0.5 * jnp.sum((y - t) ** 2)


def test_metrics_of_a_conv_net(getkey):
    net = _conv_net(getkey)
    x = jax.random.normal(getkey(), (6, 2, 8, 8))
    t = jax.random.normal(getkey(), (6, 5))
    fa = bfx.convert(net, "fa", key=getkey())
    # Weight angles: between the flattened kernel and its feedback kernel.
    angles = bfx.weight_alignment(fa)
    layers: list[Any] = [fa[0], fa[2], fa[5]]
    for i, layer in enumerate(layers):
        assert isinstance(layer, bfx.FA)
        w = np.ravel(np.asarray(layer.weight))
        b = np.ravel(np.asarray(layer.feedback))
        cos = w @ b / (np.linalg.norm(w) * np.linalg.norm(b))
        assert float(angles[f"weight_angle/{i}"]) == pytest.approx(
            np.degrees(np.arccos(cos)), abs=1e-8
        )
    # δ of every layer has the shape of its output, per example.
    deltas = bfx.layer_deltas(fa, x, t, _squared)
    assert [d.shape for d in deltas] == [(6, 3, 8, 8), (6, 4, 3, 3), (6, 5)]
    metrics = bfx.alignment_metrics(fa, x, t, _squared)
    assert float(metrics["delta_angle/2"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["grad_angle/2"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["delta_angle/0"]) > 1.0  # random feedback: not backprop
    # With B = W, feedback alignment is backprop: every angle is 0.
    tied = jax.tree_util.tree_map(
        lambda m: (
            eqx.tree_at(lambda f: f.feedback, m, m.weight)
            if isinstance(m, bfx.FA)
            else m
        ),
        fa,
        is_leaf=lambda m: isinstance(m, bfx.FA),
    )
    tied_metrics = bfx.alignment_metrics(tied, x, t, _squared)
    for name, value in tied_metrics.items():
        if name.startswith(("delta_angle", "grad_angle", "weight_angle")):
            assert float(value) == pytest.approx(0.0, abs=1e-5), name


def test_metrics_of_a_lowered_conv_net_equal_those_of_the_original(getkey):
    # The trainer's CPU path: convolutions as `bfx.Im2colConv`, pools as blocks.
    net = bfx.convert(_conv_net(getkey), "fa", key=getkey())
    x = jax.random.normal(getkey(), (6, 2, 8, 8))
    t = jax.random.normal(getkey(), (6, 5))
    lowered = bfx.im2col_layers(net)
    assert any(
        isinstance(m, bfx.Im2colConv)
        for m in jax.tree_util.tree_leaves(
            lowered, is_leaf=lambda m: isinstance(m, bfx.Im2colConv)
        )
    )
    expected = alignment_metrics(net, x, t, _squared)
    got = alignment_metrics(lowered, x, t, _squared)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(float(value), abs=1e-9), name


def test_backprop_deltas_of_a_conv_net_are_its_output_cotangents(getkey):
    net = _conv_net(getkey)
    x = jax.random.normal(getkey(), (3, 2, 8, 8))
    t = jax.random.normal(getkey(), (3, 5))
    deltas = bfx.layer_deltas(net, x, t, _squared)

    # Reference: the cotangent at the first conv's output, by hand.
    def from_first(a, xi, ti):
        rest = eqx.nn.Sequential(list(net.layers[1:]))
        return _squared(rest(a), ti)

    for n in range(3):
        a = net.layers[0](x[n])
        expected = jax.grad(from_first)(a, x[n], t[n])
        np.testing.assert_allclose(deltas[0][n], expected, rtol=1e-10, atol=1e-12)
