"""Construction, conversion, DFA in hand-written models, and clear errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

import bioflax_eqx as bfx

from .helpers import tree_allclose


LINEARS = [bfx.FALinear, bfx.KPLinear, bfx.USFLinear, bfx.FRSFLinear, bfx.BRSFLinear]


@pytest.mark.parametrize("cls", LINEARS)
def test_forward_is_weight_times_input_plus_bias(cls, getkey):
    layer = cls(5, 3, key=getkey())
    x = jax.random.normal(getkey(), (5,))
    y = layer(x, key=getkey())
    assert tree_allclose(y, layer.weight @ x + layer.bias)
    assert layer.weight.shape == (3, 5) and layer.feedback.shape == (5, 3)
    no_bias = cls(5, 3, use_bias=False, dtype=jnp.float32, key=getkey())
    assert no_bias.bias is None and no_bias.weight.dtype == jnp.float32


def test_feedback_is_an_independent_draw_from_the_weight_distribution(getkey):
    layer = bfx.FALinear(400, 300, key=getkey())
    bound = 1 / 400**0.5
    assert float(jnp.max(jnp.abs(layer.feedback))) <= bound
    # U(-k, k) has standard deviation k/√3; the weight's draw is a different one.
    assert abs(float(jnp.std(layer.feedback)) - bound / 3**0.5) < 0.02 * bound
    assert not tree_allclose(layer.feedback, layer.weight.T)
    scaled = bfx.FALinear(400, 300, feedback_scale=0.1, key=getkey())
    assert float(jnp.max(jnp.abs(scaled.feedback))) <= 0.1 * bound


def test_convert_keeps_weights_and_draws_feedback(getkey):
    model = eqx.nn.MLP(4, 3, 5, 2, key=getkey())
    # (brSF is left out: eqx.nn.MLP passes no key to its layers, and brSF needs one.)
    for rule in ("fa", "kp", "usf", "frsf"):
        converted = bfx.convert(model, rule, key=getkey())
        for old, new in zip(model.layers, converted.layers):
            assert type(new).__name__.lower().startswith(rule)
            assert tree_allclose((old.weight, old.bias), (new.weight, new.bias))
        x = jax.random.normal(getkey(), (4,))
        assert tree_allclose(model(x), converted(x))
    back = bfx.convert(bfx.convert(model, "fa", key=getkey()), "bp")
    assert tree_allclose(back, model)


def test_convert_an_mlp_between_rules(getkey):
    model = bfx.MLP(4, 3, 5, 2, rule="fa", key=getkey())
    x = jax.random.normal(getkey(), (4,))
    for rule in bfx.RULES:
        converted = bfx.convert(model, rule, key=getkey(), error_features=3)
        assert converted.rule == rule
        assert tree_allclose(converted(x, key=getkey()), model(x))


class HandWrittenDFA(eqx.Module):
    """A user model: an Equinox MLP block, then a DFA layer, with a feedback point."""

    block: eqx.nn.MLP
    point: bfx.DFAFeedback
    head: bfx.DFALinear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.block = eqx.nn.MLP(4, 6, 5, 1, activation=jnp.tanh, key=k1)
        self.point = bfx.DFAFeedback(6, 3, key=k2)
        self.head = bfx.DFALinear(6, 3, 3, key=k3)

    def __call__(self, x):
        channel = bfx.open_error_channel(x, 3)
        h, channel = self.point(jnp.tanh(self.block(x)), channel)
        y, channel = self.head(h, channel)
        return bfx.close_error_channel(y, channel)


def test_dfa_feedback_point_in_a_hand_written_model(getkey):
    model = HandWrittenDFA(getkey())
    x = jax.random.normal(getkey(), (7, 4))
    t = jax.random.normal(getkey(), (7, 3))

    def loss(model):
        return 0.5 * jnp.sum((jax.vmap(model)(x) - t) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
    e = jax.vmap(model)(x) - t
    # The block's output receives B e, then ordinary backprop runs inside the block.
    h = jax.vmap(model.block)(x)
    h_bar = (1 - jnp.tanh(h) ** 2) * (e @ model.point.feedback.T)
    params, static = eqx.partition(model.block, eqx.is_array)
    _, block_vjp = jax.vjp(lambda p: jax.vmap(eqx.combine(p, static))(x), params)
    (expected_block,) = block_vjp(h_bar)
    assert tree_allclose(eqx.filter(grads.block, eqx.is_array), expected_block)
    assert tree_allclose(
        grads.head.weight, e.T @ jax.vmap(lambda xi: jnp.tanh(model.block(xi)))(x)
    )
    assert tree_allclose(grads.point.feedback, jnp.zeros_like(model.point.feedback))


def test_errors_are_clear(getkey):
    with pytest.raises(ValueError, match="unknown rule 'sgd'"):
        bfx.MLP(4, 3, 5, 1, rule="sgd", key=getkey())
    with pytest.raises(ValueError, match="`out_features` must be a positive integer"):
        bfx.FALinear(4, 0, key=getkey())
    with pytest.raises(ValueError, match="`width_size` must be a positive integer"):
        bfx.MLP(4, 3, -1, 1, rule="fa", key=getkey())
    with pytest.raises(ValueError, match="`depth` must be a non-negative integer"):
        bfx.MLP(4, 3, 5, -1, rule="fa", key=getkey())
    with pytest.raises(ValueError, match="`feedback_scale` must be a positive"):
        bfx.KPLinear(4, 3, feedback_scale=0.0, key=getkey())
    with pytest.raises(ValueError, match="`error_features` must be a positive integer"):
        bfx.DFALinear(4, 3, 0, key=getkey())
    layer = bfx.FALinear(4, 3, key=getkey())
    with pytest.raises(
        ValueError, match=r"expects an input of shape \(4,\), got \(5,\)"
    ):
        layer(jnp.zeros(5))
    bad = eqx.tree_at(lambda m: m.feedback, layer, jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"`feedback` must have shape \(4, 3\)"):
        bad(jnp.zeros(4))
    dfa = bfx.DFALinear(4, 3, 2, key=getkey())
    with pytest.raises(ValueError, match="error channel of shape"):
        dfa(jnp.zeros(4), jnp.zeros(3))
    with pytest.raises(ValueError, match="needs `key=`"):
        bfx.convert(eqx.nn.Linear(2, 2, key=getkey()), "fa")
    # Mismatched shapes between arguments are caught by the jaxtyping annotations.
    with pytest.raises(TypeCheckError, match="channel"):
        bfx.close_error_channel(jnp.zeros(3), jnp.zeros(2))
