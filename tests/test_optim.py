"""Optimiser masks and filters: fixed feedback never moves; Kolen-Pollack's W − B
(the papers' W − Bᵀ; `feedback` is stored in the weight's layout) decays as
(1 − ηλ)^t."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bioflax_eqx as bfx

from .helpers import layers_of, tree_allclose


def _loss(model, x, t):
    y = jax.vmap(model)(x)
    return jnp.mean((y - t) ** 2)


def _train(model, optimizer, steps, key, *, spec=eqx.is_inexact_array):
    """`steps` steps of `optimizer` on the half of `model` selected by `spec`."""
    params, static = eqx.partition(model, spec)
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
    # Both in the weight's layout: the papers' W − Bᵀ.
    return [np.asarray(layer.weight - layer.feedback) for layer in layers_of(model)]


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
    assert not tree_allclose(
        layers_of(trained)[0].weight, factor * layers_of(model)[0].weight
    )


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
    assert not tree_allclose(layers_of(model)[0].weight, layers_of(trained)[0].weight)


def test_unmasked_adamw_would_move_feedback(getkey):
    # Why the mask exists: the feedback's gradient is zero, yet decay shrinks it.
    model = bfx.MLP(6, 3, 8, 1, rule="fa", key=getkey())
    trained = _train(model, optax.adamw(LR, weight_decay=DECAY), 5, getkey())
    before, after = model.layers[0], trained.layers[0]
    assert isinstance(before, bfx.FA) and isinstance(after, bfx.FA)
    assert not tree_allclose(before.feedback, after.feedback)


def test_decay_mask_and_labels(getkey):
    kp = bfx.MLP(4, 2, 3, 1, rule="kp", key=getkey())
    # (The masks hold bools, not arrays: read them through `.layer`, not through the
    # wrappers' `weight` and `bias` properties.)
    mask = bfx.decay_mask(kp)
    assert [(m.layer.weight, m.layer.bias, m.feedback) for m in mask.layers] == [
        (True, False, True)
    ] * 2
    with_bias = bfx.decay_mask(kp, include_bias=True)
    assert all(m.layer.bias for m in with_bias.layers)
    fa = bfx.MLP(4, 2, 3, 1, rule="fa", key=getkey())
    assert [m.feedback for m in bfx.decay_mask(fa).layers] == [False, False]
    assert [m.layer.weight for m in bfx.decay_mask(fa).layers] == [True, True]
    assert [m.feedback for m in bfx.feedback_labels(fa).layers] == ["fixed", "fixed"]
    assert [m.layer.weight for m in bfx.feedback_labels(fa).layers] == ["trainable"] * 2
    assert [m.feedback for m in bfx.feedback_labels(kp).layers] == ["trainable"] * 2
    frsf = bfx.MLP(4, 2, 3, 1, rule="frsf", key=getkey())
    assert [m.magnitude for m in bfx.feedback_labels(frsf).layers] == ["fixed"] * 2
    dfa = bfx.MLP(4, 2, 3, 1, rule="dfa", key=getkey())
    assert [m.feedback for m in bfx.feedback_labels(dfa).layers] == ["fixed"] * 2
    # Sign symmetry stores no feedback array: nothing to label but W and b.
    usf = bfx.MLP(4, 2, 3, 1, rule="usf", key=getkey())
    assert set(jax.tree_util.tree_leaves(bfx.feedback_labels(usf))) == {"trainable"}
    assert len(jax.tree_util.tree_leaves(bfx.feedback_labels(usf))) == 4
    # A plain Equinox model has nothing to freeze.
    linear = eqx.nn.Linear(3, 2, key=getkey())
    assert bfx.feedback_labels(linear).weight == "trainable"


def _fixed_arrays(model) -> list:
    """The model's fixed feedback arrays, in pytree order."""
    labels = bfx.feedback_labels(model)
    return [
        x
        for x, label in zip(
            jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)),
            jax.tree_util.tree_leaves(labels),
        )
        if label == "fixed"
    ]


@pytest.mark.parametrize("rule", bfx.RULES)
def test_trainable_leaves_fixed_feedback_out(rule, getkey):
    model = bfx.MLP(4, 2, 3, 1, rule=rule, key=getkey())
    params, static = eqx.partition(model, bfx.trainable(model))
    # The filter spec has the model's structure, one bool per leaf.
    assert jax.tree_util.tree_structure(bfx.trainable(model)) == (
        jax.tree_util.tree_structure(model)
    )
    for layer, half in zip(layers_of(model), layers_of(params)):
        # Weights and biases are always in the trained half.
        assert half.weight is layer.weight and half.bias is layer.bias
        if rule in ("fa", "wm", "dfa"):
            assert half.feedback is None and layer.feedback is not None
        elif rule == "kp":
            assert half.feedback is layer.feedback
        elif rule == "frsf":
            assert half.magnitude is None and layer.magnitude is not None
    # Exactly the fixed feedback is left out, and it lands in the static half.
    n_fixed = {"fa": 2, "wm": 2, "dfa": 2, "frsf": 2}.get(rule, 0)
    assert len(_fixed_arrays(model)) == n_fixed
    assert len(jax.tree_util.tree_leaves(params)) == 4 + (2 if rule == "kp" else 0)
    assert len(jax.tree_util.tree_leaves(eqx.filter(static, eqx.is_array))) == n_fixed
    assert eqx.tree_equal(eqx.combine(params, static), model)


@pytest.mark.parametrize("rule", ["fa", "dfa", "frsf"])
def test_trainable_half_with_plain_adamw_never_moves_fixed_feedback(rule, getkey):
    # No freeze_feedback: the optimiser never sees fixed feedback at all.
    model = bfx.MLP(6, 3, 8, 2, rule=rule, key=getkey())
    optimizer = optax.adamw(LR, weight_decay=DECAY, mask=bfx.decay_mask)
    params = eqx.filter(model, bfx.trainable(model))
    # No optimiser state for fixed feedback: Adam's moments hold W and b only.
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    mu = opt_state[0].mu  # pyright: ignore[reportIndexIssue, reportAttributeAccessIssue]
    assert len(jax.tree_util.tree_leaves(mu)) == 2 * len(model.layers)
    trained = _train(model, optimizer, 5, getkey(), spec=bfx.trainable(model))
    before, after = _fixed_arrays(model), _fixed_arrays(trained)
    assert len(before) == len(after) == len(model.layers)
    assert all(bool(jnp.all(a == b)) for a, b in zip(before, after))
    assert not tree_allclose(layers_of(model)[0].weight, layers_of(trained)[0].weight)


def test_trainable_half_keeps_the_kp_decay_identity(getkey):
    model = bfx.MLP(6, 3, 8, 2, rule="kp", key=getkey())
    start = _weight_minus_feedback(model)
    optimizer = optax.adamw(LR, weight_decay=DECAY, mask=bfx.decay_mask)
    trained = _train(model, optimizer, STEPS, getkey(), spec=bfx.trainable(model))
    factor = (1 - LR * DECAY) ** STEPS
    for before, after in zip(start, _weight_minus_feedback(trained)):
        np.testing.assert_allclose(after, factor * before, rtol=1e-8, atol=1e-12)
    assert not tree_allclose(
        layers_of(trained)[0].weight, factor * layers_of(model)[0].weight
    )
    # ... and the feedback really moved (it trains).
    assert not tree_allclose(
        layers_of(trained)[0].feedback, layers_of(model)[0].feedback
    )


def test_trainable_matches_freeze_feedback(getkey):
    # The cheap path and the masked path train the same model, step for step.
    model = bfx.MLP(6, 3, 8, 2, rule="fa", key=getkey())
    key = getkey()
    adamw = optax.adamw(LR, weight_decay=DECAY, mask=bfx.decay_mask)
    cheap = _train(model, adamw, 5, key, spec=bfx.trainable(model))
    masked = _train(model, bfx.freeze_feedback(adamw), 5, key)
    assert tree_allclose(cheap, masked, rtol=1e-12, atol=1e-14)


def _kp_convnet(key):
    keys = jax.random.split(key, 3)
    net = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(2, 3, 3, padding=1, key=keys[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(3 * 5 * 5, 4, key=keys[1]),
        ]
    )
    return bfx.convert(net, "kp", key=keys[2])


@pytest.mark.parametrize(
    "optimizer, moments",
    [(optax.adam(LR), 2), (optax.sgd(LR, momentum=0.9), 1), (optax.rmsprop(LR), 1)],
    ids=["adam", "momentum", "rmsprop"],
)
def test_tie_feedback_trains_kp_step_for_step(optimizer, moments, getkey):
    # Without weight decay B's own optimiser state would only repeat W's: giving B
    # W's update is the same training, to the last bit, with half the state.
    model = bfx.MLP(6, 3, 8, 2, rule="kp", key=getkey())
    key = getkey()
    spec = bfx.trainable(model)
    tied = _train(model, bfx.tie_feedback(optimizer), 8, key, spec=spec)
    plain = _train(model, optimizer, 8, key, spec=spec)
    assert eqx.tree_equal(tied, plain)
    assert not tree_allclose(layers_of(tied)[0].feedback, layers_of(model)[0].feedback)
    # No optimiser state for B: `moments` arrays of B's size fewer.
    params = eqx.filter(model, spec)
    with jax.numpy_dtype_promotion("standard"):
        tied_state = bfx.tie_feedback(optimizer).init(params)
        plain_state = optimizer.init(params)
    size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    feedback = sum(layer.feedback.size for layer in layers_of(model))
    assert size(plain_state) - size(tied_state) == moments * feedback


def test_tie_feedback_on_convolutions_and_other_rules(getkey):
    model = _kp_convnet(getkey())
    params, static = eqx.partition(model, bfx.trainable(model))
    x = jax.random.normal(getkey(), (4, 2, 5, 5))
    grads = eqx.filter_grad(
        lambda p: jnp.sum(jax.vmap(eqx.combine(p, static))(x) ** 2)
    )(params)
    optimizer = optax.adam(LR)
    with jax.numpy_dtype_promotion("standard"):
        tied, _ = bfx.tie_feedback(optimizer).update(
            grads, bfx.tie_feedback(optimizer).init(params), params
        )
        plain, _ = optimizer.update(grads, optimizer.init(params), params)
    assert eqx.tree_equal(tied, plain)
    assert isinstance(tied, eqx.nn.Sequential)
    conv = tied[0]
    assert isinstance(conv, bfx.KP) and conv.feedback.shape == (3, 2, 3, 3)
    # A model without KP layers: the optimiser itself.
    fa = bfx.MLP(6, 3, 8, 2, rule="fa", key=getkey())
    key = getkey()
    spec = bfx.trainable(fa)
    assert eqx.tree_equal(
        _train(fa, bfx.tie_feedback(optimizer), 3, key, spec=spec),
        _train(fa, optimizer, 3, key, spec=spec),
    )


def test_tie_feedback_is_not_kp_under_weight_decay(getkey):
    # Why the trainer ties only without decay: decay reads the array, and tied B
    # would follow W's decay instead of its own, so W − B would not shrink.
    model = bfx.MLP(6, 3, 8, 2, rule="kp", key=getkey())
    start = _weight_minus_feedback(model)
    adamw = optax.adamw(LR, weight_decay=DECAY, mask=bfx.decay_mask)
    tied = _train(model, bfx.tie_feedback(adamw), STEPS, getkey())
    for before, after in zip(start, _weight_minus_feedback(tied)):
        np.testing.assert_allclose(after, before, rtol=1e-8, atol=1e-12)
