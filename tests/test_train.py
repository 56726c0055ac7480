"""`bfx.train`: validation before any work, bit-identical resume, no retracing,
divergence, checkpoint errors, Kolen-Pollack alignment under weight decay; the conv
nets, a model of one's own with batch norm, CIFAR-10 with augmentation.

The MNIST runs share one small configuration (and so their compiled programs)."""

import collections
import dataclasses
import json
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bioflax_eqx as bfx
from bioflax_eqx import models
from bioflax_eqx.data import IMAGE_SHAPES
from bioflax_eqx.training import _checkpoint, _compiled, _config, _optimizer
from bioflax_eqx.training._build import build_model

from .helpers import layers_of, tree_allclose


# 500 training, 100 validation and 600 test examples; 10 steps per epoch. A warm-up,
# so that the step count matters: the optimiser state must be restored exactly.
SMALL: dict[str, Any] = dict(
    dataset="mnist",
    limit=600,
    val_size=100,
    width=16,
    depth=1,
    batch_size=50,
    warmup_epochs=1,
    metrics_batch=100,
)


def small(tmp_path, mnist_dir, **changes) -> bfx.TrainConfig:
    fields = {**SMALL, "data_dir": str(mnist_dir), "out": str(tmp_path), **changes}
    return bfx.TrainConfig(**fields)


def _without_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in history]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(lr=0.0), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(weight_decay=1.0), "weight_decay"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(width=0), "width"),
        (dict(depth=-1), "depth"),
        (dict(rule="backprop"), "rule"),
        (dict(dataset="imagenet"), "dataset"),
        (dict(model="resnet50"), "model"),
        (dict(model="lenet", dataset="sine", limit=None), "model"),
        (dict(optimizer="lion"), "optimizer"),
        (dict(activation="softplus"), "activation"),
        (dict(schedule="step"), "schedule"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=501), "batch_size"),  # 600 - 100 training examples
        (dict(epochs=0), "epochs"),
        (dict(val_size=600), "val_size"),
        (dict(limit=0), "limit"),
        (dict(feedback_scale=0.0), "feedback_scale"),
        (dict(schedule="cosine", warmup_epochs=3, epochs=3), "warmup_epochs"),
        (dict(dataset="sine", limit=None, n_train=10, val_size=0), "batch_size"),
        (dict(dataset="sine"), "limit"),
    ],
)
def test_bad_configuration_is_refused_naming_the_field(changes, field, tmp_path):
    fields = {**SMALL, "out": str(tmp_path / "run"), **changes}
    with pytest.raises(bfx.ConfigError, match=f"`{field}`") as info:
        bfx.TrainConfig(**fields)
    assert info.value.field == field
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("steps", [1, 5, 16, 37, 100])
def test_loss_curve_averages_consecutive_stretches_of_steps(steps):
    losses = np.random.default_rng(steps).normal(size=steps).astype(np.float32)
    expected = [part.mean() for part in np.array_split(losses, min(steps, 16))]
    curve = _compiled.loss_curve(jnp.asarray(losses), points=16)
    np.testing.assert_allclose(curve, expected, rtol=1e-6, atol=1e-6)


def test_config_round_trips_and_rejects_unknown_fields():
    config = bfx.TrainConfig(rule="kp", lr=0.01, epochs=3)
    assert bfx.TrainConfig.from_dict(config.to_dict()) == config
    assert config.split_sizes == (55_000, 5000, 10_000)
    with pytest.raises(bfx.ConfigError, match="`widths` is not a TrainConfig field"):
        bfx.TrainConfig.from_dict({**config.to_dict(), "widths": [3]})


def test_auto_activation_is_the_models_own_and_recorded_resolved():
    assert bfx.TrainConfig().activation == "relu"
    lenet = bfx.TrainConfig(model="lenet")
    assert lenet.activation == "tanh"
    assert lenet.to_dict()["activation"] == "tanh"  # config.json: what was used
    assert bfx.TrainConfig(model="lenet", activation="relu").activation == "relu"
    assert bfx.TrainConfig(model="vgg", activation="auto").activation == "relu"
    # The LeNet's units follow the resolved field.
    model, _ = _build_with_state(_conv("lenet", "bp"))
    act = model.layers[1]
    assert isinstance(act, eqx.nn.Lambda) and act.fn is jax.nn.tanh


class _Killed(Exception):
    pass


def test_resume_is_bit_identical_and_nothing_retraces(tmp_path, mnist_dir):
    whole_config = small(tmp_path / "whole", mnist_dir, epochs=3)
    before = collections.Counter(_compiled.TRACE_COUNTS)
    whole = bfx.train(whole_config, quiet=True)
    # Once at most (other tests may have compiled the same programs already), never
    # once per epoch.
    traced = _compiled.TRACE_COUNTS - before
    assert set(traced) <= {"epoch", "evaluate"}
    assert all(count == 1 for count in traced.values())

    def kill_after_epoch_2(record):
        if record["epoch"] == 2:
            raise _Killed

    parts_config = small(tmp_path / "parts", mnist_dir, epochs=3)
    with pytest.raises(_Killed):
        bfx.train(parts_config, quiet=True, callback=kill_after_epoch_2)
    assert len(_lines(tmp_path / "parts" / "metrics.jsonl")) == 2
    assert not (tmp_path / "parts" / "summary.json").exists()
    resumed = bfx.train(parts_config, resume=True, quiet=True)
    # Another folder, an interruption and a restored state: no new compilation.
    assert _compiled.TRACE_COUNTS - before == traced

    # Model, optimiser state and RNG: the same bytes.
    whole_header, whole_payload = _checkpoint.read_header(tmp_path / "whole")
    parts_header, parts_payload = _checkpoint.read_header(tmp_path / "parts")
    assert whole_payload == parts_payload
    assert whole_header["epoch"] == parts_header["epoch"] == 3
    for a, b in zip(
        jax.tree_util.tree_leaves(whole.model), jax.tree_util.tree_leaves(resumed.model)
    ):
        assert a.dtype == jnp.float32  # float32 training, even with x64 on
        np.testing.assert_array_equal(a, b)
    assert _without_times(whole.history) == _without_times(resumed.history)
    assert _without_times(_lines(tmp_path / "whole" / "metrics.jsonl")) == (
        _without_times(_lines(tmp_path / "parts" / "metrics.jsonl"))
    )
    loaded = bfx.load_run(tmp_path / "parts")
    assert eqx.tree_equal(loaded.model, resumed.model)
    # Resuming a finished run only rewrites its summary and plots.
    again = bfx.train(parts_config, resume=True, quiet=True)
    assert _without_times(again.history) == _without_times(resumed.history)


def test_files_written(tmp_path, mnist_dir):
    result = bfx.train(small(tmp_path, mnist_dir, epochs=2), quiet=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoint.eqx",
        "learning_curves.png",
        "alignment.png",
    }
    for png in ("learning_curves.png", "alignment.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "config.json").read_text()) == result.config.to_dict()
    history = _lines(tmp_path / "metrics.jsonl")
    assert history == result.history and [r["epoch"] for r in history] == [1, 2]
    expected = {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss"}
    expected |= {"train_loss_curve"}
    expected |= {"test_acc", "lr", "train_time_s", "eval_time_s", "wall_time_s"}
    expected |= {f"grad_angle/{i}" for i in ("0", "1", "global")}
    expected |= {f"grad_norm_ratio/{i}" for i in ("0", "1", "global")}
    expected |= {f"delta_angle/{i}" for i in ("0", "1", "global")}
    expected |= {"weight_angle/0", "weight_angle/1"}
    expected |= {"feedback_norm_ratio/0", "feedback_norm_ratio/1"}
    assert set(history[0]) == expected | {"epoch"}
    assert 0.0 < history[-1]["test_acc"] <= 1.0
    assert history[0]["delta_angle/1"] == 0.0  # the output layer's δ is backprop's
    for record in history:  # the curve's stretches cover the epoch's steps
        curve = record["train_loss_curve"]
        assert 1 <= len(curve) <= _compiled.CURVE_POINTS
        assert min(curve) <= record["train_loss"] <= max(curve)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"] == history[-1] and summary["status"] == "completed"
    assert summary["n_params"] == 784 * 16 + 16 + 16 * 10 + 10
    assert summary["n_fixed_feedback_params"] == 784 * 16 + 16 * 10
    # FA (the default rule) trained its weights but never its feedback.
    initial = _build(result.config)
    for before, after in zip(initial.layers, result.model.layers):
        assert isinstance(before, bfx.FA) and isinstance(after, bfx.FA)
        np.testing.assert_array_equal(before.feedback, after.feedback)
        assert not tree_allclose(before.weight, after.weight)


def test_existing_runs_and_bad_checkpoints_are_refused_before_any_work(
    tmp_path, mnist_dir
):
    config = small(tmp_path, mnist_dir, epochs=1)
    bfx.train(config, quiet=True)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def unchanged():
        return {p.name: p.read_bytes() for p in tmp_path.iterdir()} == written

    with pytest.raises(FileExistsError, match="already holds a run"):
        bfx.train(config, quiet=True)
    assert unchanged()
    other = dataclasses.replace(config, width=8, epochs=2)
    with pytest.raises(bfx.CheckpointError, match=r"different configuration \(width"):
        bfx.train(other, resume=True, quiet=True)
    cosine = dataclasses.replace(config, epochs=2, schedule="cosine")
    with pytest.raises(bfx.CheckpointError, match="schedule="):
        bfx.train(cosine, resume=True, quiet=True)
    shorter = dataclasses.replace(config, epochs=2)
    missing = dataclasses.replace(shorter, out=str(tmp_path / "nothing"))
    with pytest.raises(bfx.CheckpointError, match="does not exist"):
        bfx.train(missing, resume=True, quiet=True)
    assert unchanged()

    checkpoint = tmp_path / "checkpoint.eqx"
    checkpoint.write_bytes(written["checkpoint.eqx"][:-100])
    with pytest.raises(bfx.CheckpointError, match="truncated or corrupt"):
        bfx.train(shorter, resume=True, quiet=True)
    with pytest.raises(bfx.CheckpointError, match="truncated or corrupt"):
        bfx.load_run(tmp_path)
    checkpoint.unlink()
    with pytest.raises(bfx.CheckpointError, match="holds no checkpoint"):
        bfx.train(shorter, resume=True, quiet=True)

    # --overwrite replaces the run.
    result = bfx.train(shorter, overwrite=True, quiet=True)
    assert _lines(tmp_path / "metrics.jsonl") == result.history
    assert len(result.history) == 2


def test_huge_learning_rate_stops_with_a_clear_message(tmp_path, mnist_dir):
    config = small(tmp_path, mnist_dir, lr=1e30, epochs=2)
    with pytest.raises(bfx.DivergedError, match="diverged in epoch 1.*--lr"):
        bfx.train(config, quiet=True)
    assert not (tmp_path / "checkpoint.eqx").exists()


def test_nan_keeps_the_last_good_checkpoint(tmp_path, mnist_dir, monkeypatch):
    real = _compiled.train_epoch
    calls = []

    def nan_in_epoch_2(*args):
        params, state, opt_state, loss, acc, curve, finite = real(*args)
        calls.append(None)
        if len(calls) == 2:
            nan = jnp.float32(jnp.nan)
            return params, state, opt_state, nan, acc, curve, jnp.array(False)
        return params, state, opt_state, loss, acc, curve, finite

    monkeypatch.setattr(_compiled, "train_epoch", nan_in_epoch_2)
    config = small(tmp_path, mnist_dir, epochs=3)
    with pytest.raises(bfx.DivergedError, match=r"epoch 2.*checkpoint \(epoch 1\)"):
        bfx.train(config, quiet=True)
    assert len(_lines(tmp_path / "metrics.jsonl")) == 1
    assert not (tmp_path / "summary.json").exists()
    assert bfx.load_run(tmp_path).history[-1]["epoch"] == 1


def _build_with_state(config: bfx.TrainConfig, seed: int = 0) -> tuple[Any, Any]:
    """The initial model and state of a run; under train's dtype promotion, so that
    the operations compiled for the runs of the other tests are reused."""
    with jax.numpy_dtype_promotion("standard"):
        key = jax.random.split(jax.random.key(seed), 4)[1]  # as train derives it
        return build_model(config, key)


def _build(config: bfx.TrainConfig, seed: int = 0) -> Any:
    return _build_with_state(config, seed)[0]


def test_every_rule_starts_from_the_same_weights():
    models = {
        rule: _build(bfx.TrainConfig(rule=rule, **SMALL))
        # Rules whose layers draw the same shapes: cheap, and convert is generic.
        for rule in ("bp", "fa", "kp")
    }
    for rule, model in models.items():
        assert model.rule == rule
        assert eqx.tree_equal(
            [(layer.weight, layer.bias) for layer in layers_of(model)],
            [(layer.weight, layer.bias) for layer in layers_of(models["bp"])],
        ), rule


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
    model = _build(config)
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

    @jax.jit
    def step(params, grads):
        updates, _ = transform.update(grads, transform.init(params), params)
        return eqx.apply_updates(params, updates)

    with jax.numpy_dtype_promotion("standard"):
        new = eqx.combine(step(params, grads), model)
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
    model = _build(config)
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
    assert _without_times(resumed.history) == _without_times(whole.history)
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
    model = _build(config)
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

    @jax.jit
    def step(params, grads):
        updates, _ = transform.update(grads, transform.init(params), params)
        return eqx.apply_updates(params, updates)

    with jax.numpy_dtype_promotion("standard"):
        new = eqx.combine(step(params, grads), model)
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
    initial = bfx.weight_alignment(_build(config))
    assert all(float(initial[f"weight_angle/{i}"]) > 45 for i in (0, 1))
    result = bfx.train(config, quiet=True)
    final = result.history[-1]
    for i in range(2):
        assert final[f"weight_angle/{i}"] < 5.0, final
    # Regression: losses but no accuracies, and still plots.
    assert final["test_acc"] is None and final["test_loss"] > 0
    assert "best_val_acc" not in result.summary
    assert (tmp_path / "learning_curves.png").exists()


def test_no_output_folder_writes_nothing(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small(tmp_path, mnist_dir, epochs=1, out=None)
    result = bfx.train(config, quiet=True)
    assert list(tmp_path.iterdir()) == []
    assert result.summary["epochs"] == 1
    with pytest.raises(bfx.ConfigError, match="`out`"):
        bfx.train(config, resume=True)


# ------------------------------------------------------------- types of the fields


def _wrongly_typed(annotation) -> list[Any]:
    """Values of the wrong type for a field of this annotation."""
    kind, _ = _config.field_type(annotation)
    return {
        int: ["3", 2.0, True],
        float: ["0.1", True, None],
        str: [3, None, b"fa"],
        bool: [1, "yes", None],
    }[kind]


_HINTS = {f.name: f.type for f in dataclasses.fields(bfx.TrainConfig)}
_WRONG = [
    (f.name, value)
    for f in dataclasses.fields(bfx.TrainConfig)
    for value in _wrongly_typed(_HINTS[f.name])
    # `None` is a valid value of the optional fields.
    if not (value is None and _config.field_type(_HINTS[f.name])[1])
]


def test_every_field_is_type_checked():
    assert {name for name, _ in _WRONG} == {
        f.name for f in dataclasses.fields(bfx.TrainConfig)
    }


@pytest.mark.parametrize("field, value", _WRONG)
def test_a_wrongly_typed_field_raises_the_config_error_naming_it(field, value):
    with pytest.raises(bfx.ConfigError, match=f"`{field}` must be of type") as info:
        bfx.TrainConfig(**{field: value})
    assert info.value.field == field


def test_lr_as_a_string_names_the_field():
    with pytest.raises(bfx.ConfigError, match="`lr` must be of type float") as info:
        bfx.TrainConfig(lr="0.1")  # pyright: ignore[reportArgumentType]
    assert info.value.field == "lr"
    # Integers are numbers: accepted where floats are.
    assert bfx.TrainConfig(lr=1).lr == 1


# ------------------------------------------------------------------ the conv nets


def _params(tree) -> int:
    return sum(
        x.size for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    )


def _plain(model):
    return bfx.convert(model, "bp")


def _conv(model: str, rule: str, dataset: str = "mnist", **changes) -> bfx.TrainConfig:
    fields = {**SMALL, "model": model, "rule": rule, "dataset": dataset, **changes}
    return bfx.TrainConfig(**fields)


def test_lenet_is_biotorchs():
    model, state = _build_with_state(_conv("lenet", "bp"))
    assert state is None and isinstance(model, eqx.nn.Sequential)
    convs = [x for x in model.layers if isinstance(x, eqx.nn.Conv2d)]
    denses = [x for x in model.layers if isinstance(x, eqx.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)),
        (6, 16, (5, 5)),
    ]
    assert convs[0].padding == ((2, 2), (2, 2))  # 28×28 images
    assert [(d.in_features, d.out_features) for d in denses] == [
        (400, 120),
        (120, 84),
        (84, 10),
    ]
    assert _params(model) == 61_706
    # CIFAR-10: biotorch's wider CIFAR LeNet, no padding, 5×5 features.
    cifar = models.lenet((3, 32, 32), 10, jax.nn.relu, key=jax.random.key(0))
    convs = [x for x in cifar.layers if isinstance(x, eqx.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 64)]
    assert convs[0].padding == ((0, 0), (0, 0))
    denses = [x for x in cifar.layers if isinstance(x, eqx.nn.Linear)]
    assert [(d.in_features, d.out_features) for d in denses] == [
        (64 * 5 * 5, 128),
        (128, 84),
        (84, 10),
    ]


def test_resnet20_has_he_et_als_size_and_one_dfa_point_per_block():
    config = _conv("resnet20", "bp")
    model, state = _build_with_state(config)
    assert isinstance(state, eqx.nn.State)
    # The paper's 0.27M parameters (option A shortcuts, no conv biases).
    weights = eqx.filter(model, eqx.is_inexact_array)
    assert _params(weights) == 269_722 - 2 * 16 * 3 * 3  # one input channel, not 3
    blocks = [x for x in model.layers if isinstance(x, models.ResidualBlock)]
    assert len(blocks) == 9
    assert len(bfx.convert(model, "fa", key=jax.random.key(0)).layers) == 14
    dfa, state = _build_with_state(_conv("resnet20", "dfa"))
    assert isinstance(dfa, bfx.Sequential)
    points = [x for x in dfa.layers if isinstance(x, bfx.DFA)]
    # The stem conv, every block, the output layer: one feedback point each.
    assert len(points) == 11
    assert sum(isinstance(p.layer, models.ResidualBlock) for p in points) == 9
    # Batch norms stay on backprop, outside any wrapper.
    assert isinstance(dfa.layers[1], eqx.nn.BatchNorm)

    # A batch through the DFA net, in training and in inference mode.
    x = jnp.ones((3, 1, 28, 28), jnp.float32)

    def forward(model, state):
        return jax.vmap(
            lambda xi, s: model(xi, s),
            axis_name=models.BATCH_AXIS,
            in_axes=(0, None),
            out_axes=(0, None),
        )(x, state)

    # Op by op: compiling ResNet-20 takes longer than running it on three images.
    with jax.numpy_dtype_promotion("standard"):
        y, new_state = forward(dfa, state)
        y_eval, _ = forward(eqx.nn.inference_mode(dfa), new_state)
    assert y.shape == y_eval.shape == (3, 10)
    assert not eqx.tree_equal(state, new_state)  # the running statistics moved


def test_resnet20_counts_cifar_parameters():
    model = models.resnet20((3, 32, 32), 10, jax.nn.relu, key=jax.random.key(0))
    model, _ = eqx.nn.make_with_state(lambda: model)()
    assert _params(eqx.filter(model, eqx.is_inexact_array)) == 269_722


def test_a_residual_block_hands_its_key_to_both_convolutions():
    # brSF draws its feedback magnitudes on every call, from the call's key: a block
    # that dropped its key could not train with it (ResNet-20 failed so).
    block = models.ResidualBlock(2, 4, 2, jax.nn.relu, key=jax.random.key(0))
    block, state = eqx.nn.make_with_state(lambda: block)()
    brsf = bfx.convert(block, "brsf", key=jax.random.key(1))
    assert isinstance(brsf.conv1, bfx.BRSF) and isinstance(brsf.conv2, bfx.BRSF)
    x = jax.random.normal(jax.random.key(2), (3, 2, 6, 6), jnp.float32)

    def input_grad(key):
        def loss(x):
            y, _ = jax.vmap(
                lambda xi, s: brsf(xi, s, key=key),
                axis_name=models.BATCH_AXIS,
                in_axes=(0, None),
                out_axes=(0, None),
            )(x, state)
            return jnp.sum(y**2)

        return jax.grad(loss)(x)

    with jax.numpy_dtype_promotion("standard"):
        first = input_grad(jax.random.key(3))
        again = input_grad(jax.random.key(3))
        other = input_grad(jax.random.key(4))
        with pytest.raises(ValueError, match="pass `key=`"):
            input_grad(None)
    assert eqx.tree_equal(first, again) and not tree_allclose(first, other)


@pytest.mark.parametrize("model", ["lenet", "vgg", "resnet20"])
def test_every_rule_of_a_conv_net_starts_from_the_same_weights(model):
    plain = _plain(_build(_conv(model, "bp")))
    for rule in ("fa", "usf", "dfa"):
        converted = _build(_conv(model, rule))
        # Leaves in the same order (DFA's container is a bfx.Sequential).
        leaves = jax.tree_util.tree_leaves(eqx.filter(_plain(converted), eqx.is_array))
        assert eqx.tree_equal(
            leaves, jax.tree_util.tree_leaves(eqx.filter(plain, eqx.is_array))
        ), (model, rule)


def test_lenet_trains_resumes_bit_identically_and_mirrors(tmp_path, mnist_dir):
    # WM: the mirror runs inside the epoch's scan for conv layers too.
    config = small(tmp_path / "whole", mnist_dir, model="lenet", rule="wm", epochs=2)
    whole = bfx.train(config, quiet=True)
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"), epochs=1)
    bfx.train(parts, quiet=True)
    resumed = bfx.train(dataclasses.replace(parts, epochs=2), resume=True, quiet=True)
    assert (
        _checkpoint.read_header(tmp_path / "whole")[1]
        == _checkpoint.read_header(tmp_path / "parts")[1]
    )
    assert _without_times(whole.history) == _without_times(resumed.history)
    initial = _build(config)
    before = [x for x in initial.layers if isinstance(x, bfx.WM)]
    after = [x for x in whole.model.layers if isinstance(x, bfx.WM)]
    assert len(after) == 5
    for a, b in zip(before, after):
        assert not tree_allclose(a.feedback, b.feedback)  # the mirror moved B
    assert set(whole.history[-1]) >= {f"weight_angle/{i}" for i in range(5)}
    # Alignment improves: the mirror pulls B towards W.
    first = bfx.weight_alignment(initial)
    final = whole.history[-1]
    assert final["weight_angle/0"] < float(first["weight_angle/0"])


# --------------------------------------------------------- a model of one's own


def _own_net(key, rule: str):
    """A small conv net with batch norm (over the trainer's axis "batch")."""
    k1, k2, k3 = jax.random.split(key, 3)
    net = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(1, 4, 3, stride=2, dtype=jnp.float32, key=k1),
            eqx.nn.BatchNorm(4, axis_name="batch", mode="batch", dtype=jnp.float32),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(4 * 13 * 13, 10, dtype=jnp.float32, key=k2),
        ]
    )
    return bfx.convert(net, rule, key=k3, error_features=10, input_shape=(1, 28, 28))


def test_a_model_of_ones_own_with_batch_norm_trains_and_resumes(tmp_path, mnist_dir):
    net = _own_net(jax.random.key(1), "fa")
    config = small(tmp_path / "whole", mnist_dir, model="custom", epochs=3)
    before = collections.Counter(_compiled.TRACE_COUNTS)
    whole = bfx.train(config, model=net, quiet=True)
    traced = _compiled.TRACE_COUNTS - before
    assert all(count == 1 for count in traced.values())
    assert isinstance(whole.state, eqx.nn.State)
    # Trained, feedback untouched, running statistics updated.
    assert not tree_allclose(whole.model.layers[0].weight, net.layers[0].weight)
    np.testing.assert_array_equal(
        whole.model.layers[4].feedback, net.layers[4].feedback
    )
    assert 0.3 < whole.history[-1]["test_acc"] <= 1.0
    assert set(whole.history[-1]) >= {"grad_angle/0", "grad_angle/1", "delta_angle/0"}

    def kill_after_epoch_1(record):
        if record["epoch"] == 1:
            raise _Killed

    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    with pytest.raises(_Killed):
        bfx.train(parts, model=net, quiet=True, callback=kill_after_epoch_1)
    resumed = bfx.train(parts, model=net, resume=True, quiet=True)
    assert _compiled.TRACE_COUNTS - before == traced  # no recompilation
    # Parameters, batch-norm state, optimiser state and RNG: the same bytes.
    assert (
        _checkpoint.read_header(tmp_path / "whole")[1]
        == _checkpoint.read_header(tmp_path / "parts")[1]
    )
    assert eqx.tree_equal(whole.state, resumed.state)
    assert _without_times(whole.history) == _without_times(resumed.history)
    loaded = bfx.load_run(tmp_path / "parts", model=net)
    assert eqx.tree_equal(loaded.model, resumed.model)
    assert eqx.tree_equal(loaded.state, resumed.state)


def test_a_model_of_ones_own_must_match_the_rule(tmp_path, mnist_dir):
    net = _own_net(jax.random.key(1), "kp")
    config = small(tmp_path / "run", mnist_dir, model="custom", epochs=1)
    with pytest.raises(bfx.ConfigError, match="`rule` is 'fa', but .* with 'kp'"):
        bfx.train(config, model=net, quiet=True)
    with pytest.raises(bfx.ConfigError, match="`model` 'custom' trains a model"):
        bfx.train(config, quiet=True)
    with pytest.raises(bfx.ConfigError, match="`model` must be 'custom'"):
        bfx.train(dataclasses.replace(config, model="mlp"), model=net, quiet=True)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ CIFAR-10


@pytest.fixture
def cifar_dir(tmp_path):
    from .test_cifar import FOLDER, _write_folder

    _write_folder(tmp_path / "cifar" / FOLDER)
    return tmp_path / "cifar"


def _cifar(tmp_path, cifar_dir, **changes) -> bfx.TrainConfig:
    # 17 training images (3 held out), 6 test images.
    fields = dict(
        model="lenet",
        dataset="cifar10",
        data_dir=str(cifar_dir),
        val_size=3,
        batch_size=7,
        metrics_batch=3,
        epochs=1,
        out=str(tmp_path),
    )
    return bfx.TrainConfig(**{**fields, **changes})


def test_cifar10_trains_with_seeded_augmentation(tmp_path, cifar_dir):
    runs = {
        name: bfx.train(_cifar(tmp_path / name, cifar_dir, **changes), quiet=True)
        for name, changes in [
            ("a", {}),
            ("b", {}),
            ("plain", dict(augment="none")),
        ]
    }
    assert _without_times(runs["a"].history) == _without_times(runs["b"].history)
    assert eqx.tree_equal(runs["a"].model, runs["b"].model)  # a pure function
    assert not eqx.tree_equal(runs["a"].model, runs["plain"].model)
    assert runs["a"].history[-1]["test_acc"] is not None


# CIFAR-10's default (4 pixels of padding, flips) and MNIST's 2-pixel shifts.
AUGMENT_CASES = [("cifar10", "shift-flip", 4), ("mnist", "shift", 2)]
AUGMENT_CASES += [("mnist", "shift-flip", 2)]


@pytest.mark.parametrize("dataset, augment, pad", AUGMENT_CASES)
def test_the_step_augments_exactly_as_augment_images(
    tmp_path, cifar_dir, mnist_dir, dataset, augment, pad
):
    if dataset == "cifar10":
        config = _cifar(tmp_path, cifar_dir, rule="bp", augment=augment)
    else:
        config = bfx.TrainConfig(
            model="lenet",
            rule="bp",
            data_dir=str(mnist_dir),
            augment=augment,
            limit=50,
            val_size=10,
            batch_size=8,
            epochs=1,
            out=str(tmp_path),
        )
    assert config.augment_pad == pad
    shape = IMAGE_SHAPES[dataset]
    model, state = _build_with_state(config)
    setup = _compiled.make_setup(config, model, state)
    x = jax.random.uniform(jax.random.key(3), (4, math.prod(shape)), jnp.float32)
    y = jnp.arange(4, dtype=jnp.int32)
    key = jax.random.key(4)
    with jax.numpy_dtype_promotion("standard"):
        loss, _ = _compiled.step_loss(setup)(model, None, x, y, key)
        augment_key, model_key = jax.random.split(key)
        flip = augment == "shift-flip"
        images = bfx.augment_images(augment_key, x, shape, pad=pad, flip=flip)
        assert not tree_allclose(images, x)
        logits = jax.vmap(lambda xi: model(xi.reshape(shape), key=model_key))(images)
        expected = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(4), y])
        plain = dataclasses.replace(config, augment="none")
        plain_setup = _compiled.make_setup(plain, model, state)
        unaugmented, _ = _compiled.step_loss(plain_setup)(model, None, x, y, key)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert not np.isclose(loss, unaugmented)


def test_augment_auto_resolves_per_data_set_and_old_runs_load():
    assert bfx.TrainConfig(dataset="cifar10", model="lenet").augment == "shift-flip"
    assert bfx.TrainConfig(dataset="mnist").augment == "none"
    assert bfx.TrainConfig(dataset="sine", augment="shift").augment == "none"
    # Runs saved when `augment` was a bool still resume.
    old = bfx.TrainConfig(dataset="cifar10", model="lenet").to_dict()
    for saved, now in [(True, "shift-flip"), (False, "none")]:
        assert bfx.TrainConfig.from_dict({**old, "augment": saved}).augment == now


# ------------------------------------------- Akrout et al.'s setting (experiments)


def test_loss_choices():
    assert bfx.TrainConfig().loss == "cross_entropy"  # `auto`, resolved
    assert bfx.TrainConfig(dataset="sine").loss == "squared_error"
    changes: list[dict[str, Any]] = [
        dict(loss="squared_error"),
        dict(dataset="sine", loss="cross_entropy"),
    ]
    for change in changes:
        with pytest.raises(bfx.ConfigError) as info:
            bfx.TrainConfig(**change)
        assert info.value.field == "loss"
    logits = jnp.array([0.5, -1.0, 2.0], jnp.float32)
    label = jnp.array(2, jnp.int32)
    p = jax.nn.sigmoid(logits)
    expected = -jnp.sum(jnp.log(jnp.where(jnp.arange(3) == 2, p, 1 - p)))
    np.testing.assert_allclose(bfx.sigmoid_cross_entropy(logits, label), expected, 1e-6)


@pytest.mark.parametrize("rule", ["fa", "dfa", "frsf", "usf"])
def test_akrout_init_draws_every_array_from_the_fans(rule):
    config = bfx.TrainConfig(**{**SMALL, "width": 400}, rule=rule, init="akrout")
    model = _build(config)
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
    model = _build(config)
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
    before = _build(dataclasses.replace(config, mirror_steps_before=3))
    plain = _build(config)
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
