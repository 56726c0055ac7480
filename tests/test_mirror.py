"""The weight mirror: one mirror step against its equation, its expectation, and the
alignment it produces; the learning phase is feedback alignment's."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx


def _layers(getkey):
    return [
        eqx.nn.Linear(6, 4, key=getkey()),
        eqx.nn.Conv2d(3, 5, (2, 3), groups=1, key=getkey()),
        eqx.nn.Conv1d(4, 6, 3, groups=2, key=getkey()),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_mirror_step_is_its_equation(index, getkey):
    layer = bfx.WM(_layers(getkey)[index], key=getkey())
    key = getkey()
    lr, sigma, decay, n = 0.3, 0.7, 0.5, 9
    new = bfx.mirror([layer], key, lr=lr, noise_std=sigma, decay=decay, batch_size=n)
    # Reference from the equation, in NumPy: x ~ N(0, σ²), y = W x per noise vector.
    w = np.asarray(layer.weight).reshape(layer.weight.shape[0], -1)
    (k,) = jax.random.split(key, 1)
    x = sigma * np.asarray(jax.random.normal(k, (n, w.shape[1]), jnp.float64))
    y = x @ w.T
    corr = sum(np.outer(y[i], x[i]) for i in range(n)) / n
    b = np.asarray(layer.feedback).reshape(w.shape)
    expected = (1 - lr * decay) * b + lr * corr
    got = np.asarray(new[0].feedback).reshape(w.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # Nothing but the feedback moves.
    assert new[0].weight is layer.weight
    assert new[0].bias is not None and layer.bias is not None
    assert jnp.array_equal(new[0].bias, layer.bias)


def test_the_expected_update_is_sigma_squared_w_up_to_the_decay(getkey):
    layer = bfx.WM(eqx.nn.Linear(5, 3, key=getkey()), key=getkey())
    lr, sigma, decay = 0.1, 1.5, 0.4
    step = jax.jit(
        lambda m, k: bfx.mirror(
            m, k, lr=lr, noise_std=sigma, decay=decay, batch_size=4000
        )
    )
    keys = jax.random.split(getkey(), 50)
    updates = jnp.stack([step(layer, k).feedback - layer.feedback for k in keys])
    mean = updates.mean(0)
    expected = lr * (sigma**2 * layer.weight - decay * layer.feedback)
    # 200 000 noise vectors: the Monte-Carlo error is ~ lr σ² ‖W_i‖ / sqrt(2e5).
    np.testing.assert_allclose(mean, expected, atol=3e-3)
    assert bfx.angle(mean, expected) < 2.0


def test_angle_falls_below_a_few_degrees_on_a_fixed_weight(getkey):
    model = bfx.MLP(40, 10, 30, 1, rule="wm", key=getkey())
    before = bfx.weight_alignment(model)
    assert all(before[f"weight_angle/{i}"] > 70 for i in range(2))
    step = jax.jit(lambda m, k: bfx.mirror(m, k, lr=0.02, batch_size=256))
    for k in jax.random.split(getkey(), 600):
        model = step(model, k)
    after = bfx.weight_alignment(model)
    assert all(after[f"weight_angle/{i}"] < 3.0 for i in range(2)), after
    # The default fixed point is B = σ² W / λ = W: the norms match too.
    for i in range(2):
        assert abs(float(after[f"feedback_norm_ratio/{i}"]) - 1) < 0.05


def test_learning_phase_is_feedback_alignment(getkey):
    wm = bfx.MLP(7, 3, 5, 2, rule="wm", key=getkey())
    fa = eqx.tree_at(
        lambda m: m.layers,
        wm,
        tuple(
            eqx.tree_at(
                lambda f: f.feedback, bfx.FA(layer.layer, key=getkey()), layer.feedback
            )
            for layer in wm.layers
        ),
    )
    x = jax.random.normal(getkey(), (6, 7))
    t = jax.random.normal(getkey(), (6, 3))

    def loss(model):
        return jnp.sum((jax.vmap(model)(x) - t) ** 2)

    assert jnp.array_equal(jax.vmap(wm)(x), jax.vmap(fa)(x))
    g_wm = eqx.filter_grad(loss)(wm)
    g_fa = eqx.filter_grad(loss)(fa)
    for a, b in zip(g_wm.layers, g_fa.layers):
        assert jnp.array_equal(a.weight, b.weight)
        assert jnp.array_equal(a.bias, b.bias)
        assert not jnp.any(a.feedback)  # no gradient from the loss


def test_mirror_leaves_other_rules_alone_and_checks_arguments(getkey):
    linear = eqx.nn.Linear(4, 3, key=getkey())
    model = [bfx.FA(linear, key=getkey()), bfx.WM(linear, key=getkey())]
    fa, wm = bfx.mirror(model, getkey())
    assert all(
        jnp.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(fa), jax.tree_util.tree_leaves(model[0])
        )
    )
    assert not jnp.array_equal(wm.feedback, model[1].feedback)
    # A model with nothing to mirror is refused, not returned unchanged.
    with pytest.raises(ValueError, match="no `bfx.WM` layer in the MLP"):
        bfx.mirror(bfx.MLP(4, 2, 3, 1, rule="fa", key=getkey()), getkey())
    with pytest.raises(ValueError, match="batch_size"):
        bfx.mirror(model, getkey(), batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        bfx.mirror(model, getkey(), lr=-1.0)
