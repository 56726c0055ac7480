"""What the trainer optimises and how: every rule from the same initial weights,
Kolen-Pollack's tie and decay, fixed feedback kept from the optimiser, schedules,
the bias rate, Akrout et al.'s initialisation, mirror steps before training, an
unshuffled epoch."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bioflax_eqx as bfx
from bioflax_eqx.training import _checkpoint, _optimizer

from .helpers import (
    SMALL,
    build,
    layers_of,
    small,
    tree_allclose,
    without_times,
)


def test_every_rule_starts_from_the_same_weights():
    models = {
        rule: build(bfx.TrainConfig(rule=rule, **SMALL))
        # Rules whose layers draw the same shapes: cheap, and convert is generic.
        for rule in ("bp", "fa", "kp")
    }
    for rule, model in models.items():
        assert model.rule == rule
        assert eqx.tree_equal(
            [(layer.weight, layer.bias) for layer in layers_of(model)],
            [(layer.weight, layer.bias) for layer in layers_of(models["bp"])],
        ), rule


def _first_step(transform, params, grads, model):
    """`model` with `params` after one step of `transform` from its initial state."""

    @jax.jit
    def step(params, grads):
        updates, _ = transform.update(grads, transform.init(params), params)
        return eqx.apply_updates(params, updates)

    with jax.numpy_dtype_promotion("standard"):
        return eqx.combine(step(params, grads), model)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_kp_decay_shrinks_weight_minus_feedback(optimizer):
    # Decay as L2 before the learning-rate scale (sgd; momentum shares its code) or
    # decoupled (adamw): one step from a zero optimiser state shrinks W - B (stored
    # like W: the papers' W - Bᵀ) by exactly (1 - lr * decay).
    lr, decay = 0.1, 0.3
    fields = {**SMALL, "warmup_epochs": 0}
    config = bfx.TrainConfig(
        rule="kp", optimizer=optimizer, lr=lr, weight_decay=decay, **fields
    )
    model = build(config)
    # The half the trainer optimises (for KP: every floating array).
    params = eqx.filter(model, bfx.trainable(model))
    assert eqx.tree_equal(params, eqx.filter(model, eqx.is_inexact_array))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    # KP's feedback gradient is the weight gradient itself (same layout).
    grads = eqx.tree_at(
        lambda g: [layer.feedback for layer in _kp_layers(g)],
        grads,
        [layer.weight for layer in _kp_layers(grads)],
    )
    transform = _optimizer.optimizer(config)

    new = _first_step(transform, params, grads, model)
    # Adam's first step is ±lr for W and B alike: L2 before it leaves W - B as is
    # (after it, W - B would grow by 1 + decay).
    factor = 1.0 if optimizer == "adam" else 1 - lr * decay
    for before, after in zip(_kp_layers(model), _kp_layers(new)):
        np.testing.assert_allclose(
            after.weight - after.feedback,
            factor * (before.weight - before.feedback),
            rtol=1e-5,
            atol=1e-7,  # float32, as trained
        )
        # Biases are not decayed: a gradient of one moves them by -lr.
        assert after.bias is not None and before.bias is not None
        np.testing.assert_allclose(after.bias - before.bias, -lr, rtol=1e-5)


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_kp_feedback_has_optimiser_state_only_under_decay(decay):
    # Without decay B takes W's update (`bfx.tie_feedback`); with it, B is optimised
    # on its own, so that W - B shrinks.
    fields = {**SMALL, "warmup_epochs": 0}
    config = bfx.TrainConfig(rule="kp", optimizer="adam", weight_decay=decay, **fields)
    model = build(config)
    params = eqx.filter(model, bfx.trainable(model))
    with jax.numpy_dtype_promotion("standard"):
        state = _optimizer.optimizer(config).init(params)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
    n_feedback = sum(layer.feedback.size for layer in _kp_layers(model))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    own = n_params - (n_feedback if decay == 0 else 0)
    # Adam's two moments per optimised array, and step counts.
    assert 2 * own <= n_state < 2 * own + 100


def test_kp_runs_from_before_tie_feedback_resume_and_load(
    tmp_path, mnist_dir, monkeypatch
):
    # A KP checkpoint written when B had an optimiser state of its own (the untied
    # layout): it loads, resumes tied, and the run is the one that never stopped.
    config = small(tmp_path / "old", mnist_dir, rule="kp", epochs=2, warmup_epochs=0)
    whole = bfx.train(
        dataclasses.replace(config, out=str(tmp_path / "whole")), quiet=True
    )
    with monkeypatch.context() as patch:
        patch.setattr(_optimizer, "_tied", lambda config: False)
        bfx.train(dataclasses.replace(config, epochs=1), quiet=True)
    _, payload = _checkpoint.read_header(tmp_path / "old")
    _, whole_payload = _checkpoint.read_header(tmp_path / "whole")
    assert len(payload) > len(whole_payload)  # B's Adam moments: two more copies
    assert bfx.load_run(tmp_path / "old").history[-1]["epoch"] == 1
    resumed = bfx.train(config, resume=True, quiet=True)
    assert eqx.tree_equal(resumed.model, whole.model)
    assert without_times(resumed.history) == without_times(whole.history)
    # Saved again in today's layout.
    assert _checkpoint.read_header(tmp_path / "old")[1] == whole_payload


def _kp_layers(model: bfx.MLP) -> list[bfx.KP]:
    layers = [layer for layer in model.layers if isinstance(layer, bfx.KP)]
    assert len(layers) == len(model.layers)
    return layers


@pytest.mark.parametrize("rule", ["fa", "dfa", "frsf"])
def test_the_trainer_never_hands_fixed_feedback_to_the_optimiser(rule):
    # With decay on every matrix: fixed feedback must still not move, because the
    # trainer optimises `eqx.partition(model, bfx.trainable(model))` only.
    fields = {**SMALL, "warmup_epochs": 0}
    config = bfx.TrainConfig(rule=rule, optimizer="adamw", weight_decay=0.3, **fields)
    model = build(config)
    params = eqx.filter(model, bfx.trainable(model))
    fixed = [
        x
        for x, label in zip(
            jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)),
            jax.tree_util.tree_leaves(bfx.feedback_labels(model)),
        )
        if label == "fixed"
    ]
    assert len(fixed) == len(model.layers)
    # Only weights and biases are optimised: no optimiser state for fixed feedback.
    assert len(jax.tree_util.tree_leaves(params)) == 2 * len(model.layers)
    transform = _optimizer.optimizer(config)
    with jax.numpy_dtype_promotion("standard"):
        state = transform.init(params)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    # Adam's two moments and step counts, nothing for the feedback.
    assert 2 * n_params <= n_state < 2 * n_params + 100
    grads = jax.tree_util.tree_map(jnp.ones_like, params)

    new = _first_step(transform, params, grads, model)
    moved = [
        x
        for x, label in zip(
            jax.tree_util.tree_leaves(eqx.filter(new, eqx.is_inexact_array)),
            jax.tree_util.tree_leaves(bfx.feedback_labels(new)),
        )
        if label == "fixed"
    ]
    for a, b in zip(fixed, moved):
        np.testing.assert_array_equal(a, b)
    assert not tree_allclose(layers_of(new)[0].weight, layers_of(model)[0].weight)


def test_schedules():
    fields = {**SMALL, "lr": 0.5, "epochs": 3}  # 10 steps per epoch
    config = bfx.TrainConfig(**fields, schedule="cosine")
    schedule = _optimizer.schedule(config)

    def lr(step):
        return float(jnp.asarray(schedule(step)))

    assert lr(0) == 0.0
    assert lr(10) == pytest.approx(0.5)
    assert lr(20) == pytest.approx(0.25)
    assert lr(30) == pytest.approx(0.0, abs=1e-12)
    config = bfx.TrainConfig(**{**fields, "warmup_epochs": 0})
    schedule = _optimizer.schedule(config)
    assert lr(0) == lr(1000) == 0.5


def test_kp_feedback_aligns_with_the_weights_under_weight_decay(tmp_path):
    # With the same decay on W and B, W - Bᵀ shrinks by (1 - 0.05 * 0.5) per step:
    # after 200 steps to 0.6% of where it started, at ~90°.
    config = bfx.TrainConfig(
        rule="kp",
        dataset="sine",
        n_train=1000,
        val_size=100,
        n_test=100,
        width=16,
        depth=1,
        activation="tanh",
        optimizer="sgd",
        lr=0.05,
        weight_decay=0.5,
        batch_size=10,
        epochs=2,
        metrics_batch=100,
        out=str(tmp_path),
    )
    initial = bfx.weight_alignment(build(config))
    assert all(float(initial[f"weight_angle/{i}"]) > 45 for i in (0, 1))
    result = bfx.train(config, quiet=True)
    final = result.history[-1]
    for i in range(2):
        assert final[f"weight_angle/{i}"] < 5.0, final
    # Regression: losses but no accuracies, and still plots.
    assert final["test_acc"] is None and final["test_loss"] > 0
    assert "best_val_acc" not in result.summary
    assert (tmp_path / "learning_curves.png").exists()


@pytest.mark.parametrize("rule", ["fa", "dfa", "frsf", "usf"])
def test_akrout_init_draws_every_array_from_the_fans(rule):
    config = bfx.TrainConfig(**{**SMALL, "width": 400}, rule=rule, init="akrout")
    model = build(config)
    for layer in model.layers:
        linear = layer.layer
        fan_out, fan_in = linear.weight.shape
        std = 1 / math.sqrt(fan_in + fan_out)
        arrays = [linear.weight, linear.bias]
        if rule != "usf":
            arrays.append(getattr(layer, "magnitude", layer.feedback))
        # DFA's feedback has fans of its own; small arrays give rough estimates.
        for array in arrays[:2] + arrays[2:] * (rule != "dfa"):
            if array.size < 400:
                continue
            assert float(jnp.std(array)) == pytest.approx(std, rel=0.15)
    with pytest.raises(bfx.ConfigError, match="akrout is for model mlp"):
        bfx.TrainConfig(model="lenet", init="akrout")


def test_bias_lr_scale_scales_the_biases_updates_only():
    fields = {**SMALL, "warmup_epochs": 0}
    config = bfx.TrainConfig(**fields, rule="bp", optimizer="sgd", lr=0.5)
    model = build(config)
    params = eqx.filter(model, bfx.trainable(model))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for scale in (1.0, 0.25):
        scaled = dataclasses.replace(config, bias_lr_scale=scale)
        transform = _optimizer.optimizer(scaled)
        updates, _ = transform.update(grads, transform.init(params), params)
        layer = updates.layers[0]  # pyright: ignore[reportAttributeAccessIssue]
        np.testing.assert_allclose(layer.weight, -0.5)
        np.testing.assert_allclose(layer.bias, -0.5 * scale)


def test_mirror_steps_before_training_move_only_wm_feedback():
    config = bfx.TrainConfig(**SMALL, rule="wm", mirror_lr=0.1)
    before = build(dataclasses.replace(config, mirror_steps_before=3))
    plain = build(config)
    for a, b in zip(before.layers, plain.layers):
        np.testing.assert_array_equal(a.weight, b.weight)
        assert not tree_allclose(a.feedback, b.feedback)


def test_an_unshuffled_epoch_takes_the_examples_in_order(getkey):
    x = jnp.arange(12, dtype=jnp.float32)[:, None]
    xb, yb = bfx.epoch_batches(None, x, x, 5)
    np.testing.assert_array_equal(xb.reshape(-1), jnp.arange(10))
    np.testing.assert_array_equal(yb, xb)
    # Backprop draws nothing: unshuffled, the epoch is the same whatever its key.
    model = bfx.MLP(4, 2, 8, 1, rule="bp", dtype=jnp.float32, key=getkey())
    params, static = eqx.partition(model, bfx.trainable(model))
    xs = jax.random.normal(getkey(), (40, 4), jnp.float32)
    ys = jax.random.normal(getkey(), (40, 2), jnp.float32)
    optimizer = optax.sgd(0.1)

    def loss_fn(model, x, y, key):
        return jnp.mean(jnp.square(jax.vmap(model)(x) - y)), None

    def epoch(key, shuffle):
        with jax.numpy_dtype_promotion("standard"):
            return bfx.train_epoch(
                params, static, optimizer.init(params), xs, ys, key,
                optimizer=optimizer, loss_fn=loss_fn, batch_size=8, shuffle=shuffle,
            )[0]  # fmt: skip

    key1, key2 = getkey(), getkey()
    assert eqx.tree_equal(epoch(key1, False), epoch(key2, False))
    assert not tree_allclose(epoch(key1, True), epoch(key2, True))
