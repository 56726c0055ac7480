"""`bfx.TrainConfig`: every field checked on construction with a `ConfigError`
naming it, round trips through `config.json`, and the `auto` values (activation,
augmentation, loss) resolved and recorded."""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx
from bioflax_eqx.training import _config

from .helpers import (
    SMALL,
    build_with_state,
)


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
    model, _ = build_with_state(bfx.TrainConfig(**SMALL, model="lenet", rule="bp"))
    act = model.layers[1]
    assert isinstance(act, eqx.nn.Lambda) and act.fn is jax.nn.tanh


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


def test_augment_auto_resolves_per_data_set_and_old_runs_load():
    assert bfx.TrainConfig(dataset="cifar10", model="lenet").augment == "shift-flip"
    assert bfx.TrainConfig(dataset="mnist").augment == "none"
    assert bfx.TrainConfig(dataset="sine", augment="shift").augment == "none"
    # Runs saved when `augment` was a bool still resume.
    old = bfx.TrainConfig(dataset="cifar10", model="lenet").to_dict()
    for saved, now in [(True, "shift-flip"), (False, "none")]:
        assert bfx.TrainConfig.from_dict({**old, "augment": saved}).augment == now


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
