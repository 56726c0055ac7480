"""Optimiser masks: fixed feedback never moves; Kolen-Pollack's W − Bᵀ decays as
(1 − ηλ)^t."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bioflax_eqx as bfx

from .helpers import tree_allclose


def _loss(model, x, t):
    y = jax.vmap(model)(x)
    return jnp.mean((y - t) ** 2)


def _train(model, optimizer, steps, key):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)

    @eqx.filter_jit
    def step(params, opt_state, x, t):
        grads = eqx.filter_grad(lambda p: _loss(eqx.combine(p, static), x, t))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    # optax's Adam bias correction mixes a float with an int32 step count.
    with jax.numpy_dtype_promotion("standard"):
        for k in jax.random.split(key, steps):
            kx, kt = jax.random.split(k)
            x = jax.random.normal(kx, (16, model.in_size))
            t = jax.random.normal(kt, (16, model.out_size))
            params, opt_state = step(params, opt_state, x, t)
    return eqx.combine(params, static)


def _weight_minus_feedback(model):
    return [np.asarray(layer.weight - layer.feedback.T) for layer in model.layers]


LR, DECAY, STEPS = 0.05, 0.1, 60


@pytest.mark.parametrize(
    "optimizer",
    [
        # L2 decay added to the gradient before the learning-rate scale.
        optax.chain(
            optax.add_decayed_weights(DECAY, mask=bfx.decay_mask), optax.sgd(LR)
        ),
        # Decoupled decay with an elementwise optimiser: u(Gᵀ) = u(G)ᵀ.
        optax.adamw(LR, weight_decay=DECAY, mask=bfx.decay_mask),
    ],
    ids=["sgd", "adamw"],
)
def test_kp_weight_and_feedback_converge_at_the_decay_rate(optimizer, getkey):
    model = bfx.MLP(6, 3, 8, 2, rule="kp", key=getkey())
    start = _weight_minus_feedback(model)
    trained = _train(model, bfx.freeze_feedback(optimizer), STEPS, getkey())
    factor = (1 - LR * DECAY) ** STEPS
    for before, after in zip(start, _weight_minus_feedback(trained)):
        np.testing.assert_allclose(after, factor * before, rtol=1e-8, atol=1e-12)
    # The weights really trained (the identity is not the trivial no-update case).
    assert not tree_allclose(trained.layers[0].weight, factor * model.layers[0].weight)


def test_predecessor_decay_order_makes_weights_grow(getkey):
    # bioflax chained sgd *then* add_decayed_weights: the update becomes −ηG + λW, so
    # W − Bᵀ grows by (1 + λ) per step and KP never converges.
    model = bfx.MLP(6, 3, 8, 2, rule="kp", key=getkey())
    wrong = optax.chain(
        optax.sgd(LR), optax.add_decayed_weights(DECAY, mask=bfx.decay_mask)
    )
    start = _weight_minus_feedback(model)
    trained = _train(model, wrong, 10, getkey())
    for before, after in zip(start, _weight_minus_feedback(trained)):
        np.testing.assert_allclose(after, (1 + DECAY) ** 10 * before, rtol=1e-8)


@pytest.mark.parametrize("rule", ["fa", "dfa", "frsf"])
def test_fixed_feedback_never_moves_under_adamw(rule, getkey):
    model = bfx.MLP(6, 3, 8, 2, rule=rule, key=getkey())
    optimizer = bfx.freeze_feedback(optax.adamw(LR, weight_decay=DECAY))
    trained = _train(model, optimizer, 5, getkey())
    labels = bfx.feedback_labels(model)
    fixed = lambda tree: [  # noqa: E731
        x
        for x, label in zip(
            jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(labels)
        )
        if label == "fixed"
    ]
    assert len(fixed(model)) == len(model.layers)
    assert all(bool(jnp.all(a == b)) for a, b in zip(fixed(model), fixed(trained)))
    assert not tree_allclose(model.layers[0].weight, trained.layers[0].weight)


def test_unmasked_adamw_would_move_feedback(getkey):
    # Why the mask exists: the feedback's gradient is zero, yet decay shrinks it.
    model = bfx.MLP(6, 3, 8, 1, rule="fa", key=getkey())
    trained = _train(model, optax.adamw(LR, weight_decay=DECAY), 5, getkey())
    before, after = model.layers[0], trained.layers[0]
    assert isinstance(before, bfx.FALinear) and isinstance(after, bfx.FALinear)
    assert not tree_allclose(before.feedback, after.feedback)


def test_decay_mask_and_labels(getkey):
    kp = bfx.MLP(4, 2, 3, 1, rule="kp", key=getkey())
    mask = bfx.decay_mask(kp)
    assert [(m.weight, m.bias, m.feedback) for m in mask.layers] == [
        (True, False, True)
    ] * 2
    with_bias = bfx.decay_mask(kp, include_bias=True)
    assert all(m.bias for m in with_bias.layers)
    fa = bfx.MLP(4, 2, 3, 1, rule="fa", key=getkey())
    assert [m.feedback for m in bfx.decay_mask(fa).layers] == [False, False]
    assert [m.feedback for m in bfx.feedback_labels(fa).layers] == ["fixed", "fixed"]
    assert [m.feedback for m in bfx.feedback_labels(kp).layers] == ["trainable"] * 2
    # A plain Equinox model has nothing to freeze.
    linear = eqx.nn.Linear(3, 2, key=getkey())
    assert bfx.feedback_labels(linear).weight == "trainable"
