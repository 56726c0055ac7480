"""What a run starts from: its data and its model, built from the configuration (the
backprop network converted to the rule) or passed in (`model="custom"`)."""

import contextlib
import math
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray, PyTree

from .._convert import convert
from .._dfa import DFA
from .._layers import linear_layers, rule_of
from .._mlp import MLP
from .._rules import AbstractStoredRule
from .._sign import FRSF
from ..data import (
    IMAGE_SHAPES,
    IMAGE_SIZES,
    DataNotFoundError,
    Dataset,
    load_dataset,
    sine,
    teacher_student,
)
from ..models import Transformer, lenet, resnet20, vgg
from ._config import ACTIVATIONS, TEACHER, ConfigError, TrainConfig, io_shapes
from ._optimizer import mirror_step


_CONV_NETS = {"lenet": lenet, "vgg": vgg, "resnet20": resnet20}


def load_data(config: TrainConfig, key: PRNGKeyArray) -> Dataset:
    """The configuration's data set, float32; its validation split drawn by `key`."""
    n_train, n_val, n_test = config.split_sizes
    if config.dataset in IMAGE_SIZES:
        folder = None if config.data_dir is None else pathlib.Path(config.data_dir)
        existed = folder is None or folder.exists()
        try:
            return load_dataset(
                config.dataset,
                config.data_dir,
                val_size=n_val,
                key=key,
                limit=config.limit,
                dtype=jnp.float32,
            )
        except DataNotFoundError:
            # The loader made the folder to download into: leave no empty one.
            if folder is not None and not existed:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    if config.dataset == "teacher_student":
        in_size, out_size, width, depth = TEACHER
        return teacher_student(
            key,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            in_size=in_size,
            out_size=out_size,
            width=width,
            depth=depth,
            dtype=jnp.float32,
        )
    return sine(key, n_train=n_train, n_val=n_val, n_test=n_test, dtype=jnp.float32)


def _plain_model(config: TrainConfig, key: PRNGKeyArray, vocab_size: int | None) -> Any:
    """The configuration's network, trained by backprop."""
    assert config.width is not None and config.depth is not None  # resolved
    if config.model == "transformer":
        assert vocab_size is not None  # the corpus' (or its checkpoint's)
        return Transformer(
            vocab_size,
            config.context,
            config.width,
            config.depth,
            config.heads,
            jnp.float32,
            key=key,
        )
    (in_size,), out_size = io_shapes(config)
    activation = ACTIVATIONS[config.activation]
    if config.model == "mlp":
        return MLP(
            in_size,
            out_size,
            config.width,
            config.depth,
            rule="bp",
            activation=activation,
            dtype=jnp.float32,
            key=key,
        )
    image_shape = IMAGE_SHAPES[config.dataset]
    return _CONV_NETS[config.model](image_shape, out_size, activation, key=key)


def _linear(layer: Any) -> eqx.nn.Linear:
    return layer if isinstance(layer, eqx.nn.Linear) else layer.layer


def _drawn(layer: Any) -> list[Any]:
    """The arrays of one MLP layer that Akrout et al.'s code draws: the weight, the
    bias, and the random feedback of FA, KP, WM, frSF and DFA (or what stands in
    their place: `eqx.tree_at` calls it on placeholders)."""
    drawn = [_linear(layer).weight, _linear(layer).bias]
    if isinstance(layer, DFA | AbstractStoredRule):
        drawn.append(layer.feedback)
    elif isinstance(layer, FRSF):
        drawn.append(layer.magnitude)
    return drawn


def _akrout_init(model: MLP, key: PRNGKeyArray) -> MLP:
    """`model` with every array of `_drawn` from `N(0, 1/(fan_in + fan_out))`, as
    Akrout et al.'s code initialises: the layer's fans, or for DFA's feedback (from
    the output error to the layer) the output size and the layer's. uSF's and
    brSF's scales stay the library's."""
    values = []
    for layer, layer_key in zip(model.layers, jax.random.split(key, len(model.layers))):
        fan_out, fan_in = _linear(layer).weight.shape
        drawn = _drawn(layer)
        for i, (array, k) in enumerate(zip(drawn, jax.random.split(layer_key, 3))):
            fans = fan_in + fan_out
            if isinstance(layer, DFA) and i == 2:
                fans = array.shape[-1] + math.prod(array.shape[:-1])
            values.append(
                jax.random.normal(k, array.shape, array.dtype) / math.sqrt(fans)
            )

    def where(m: MLP) -> list[Any]:
        return [a for layer in m.layers for a in _drawn(layer)]

    return eqx.tree_at(where, model, values)


@eqx.filter_jit
def _mirrored(model: Any, key: PRNGKeyArray, steps: int, config: TrainConfig) -> Any:
    """`model` after `steps` weight-mirror steps (the run's), in one scan."""
    step = mirror_step(config)
    assert step is not None  # rule `wm`
    arrays, static = eqx.partition(model, eqx.is_array)

    def body(arrays, key):
        mirrored = step(eqx.combine(arrays, static), key)
        return eqx.filter(mirrored, eqx.is_array), None

    arrays, _ = jax.lax.scan(body, arrays, jax.random.split(key, steps))
    return eqx.combine(arrays, static)


def _has_state(model: PyTree) -> bool:
    leaves = jax.tree_util.tree_leaves(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
    )
    return any(isinstance(x, eqx.nn.StateIndex) for x in leaves)


def _split_state(model: PyTree, state: Any = None) -> tuple[PyTree, Any]:
    """The model without its initial state, and the state (`None` without any)."""
    if not _has_state(model):
        return model, None
    if state is None:
        state = eqx.nn.State(model)
    # Strongly typed, as a checkpoint restores it (a weakly typed counter, e.g.
    # batch norm's `jnp.array(0)`, would make the resumed run compile anew).
    state = jax.tree_util.tree_map(
        lambda x: jnp.array(x, dtype=x.dtype) if eqx.is_array(x) else x, state
    )
    return eqx.nn.delete_init_state(model), state


def build_model(
    config: TrainConfig, key: PRNGKeyArray, vocab_size: int | None = None
) -> tuple[Any, Any]:
    """The backprop network converted to the rule, so that every rule of a seed
    starts from the same weights and biases (and FA, KP, DFA and frSF from the same
    draw of feedback, where the shapes agree), initialised as `config.init` says
    and for WM mirrored `config.mirror_steps_before` times; and its state (batch
    norm), or `None`. The Transformer needs the corpus' `vocab_size`."""
    init_key, feedback_key = jax.random.split(key)
    model = _plain_model(config, init_key, vocab_size)
    if config.rule != "bp":
        model = _converted(model, config, feedback_key)
    # Keys of their own, so that the default runs keep theirs.
    if config.init == "akrout":
        model = _akrout_init(model, jax.random.fold_in(key, 1))
    if config.rule == "wm" and config.mirror_steps_before > 0:
        mirror_key = jax.random.fold_in(key, 2)
        model = _mirrored(model, mirror_key, config.mirror_steps_before, config)
    return _split_state(model)


def _converted(model: Any, config: TrainConfig, key: PRNGKeyArray) -> Any:
    """`model` converted to the configuration's rule (not `bp`)."""
    if config.model == "transformer":  # it places its own DFA points
        dfa = config.rule == "dfa"
        placement = config.dfa_placement if dfa else None
        return convert(
            model,
            config.rule,
            key=key,
            feedback_scale=config.feedback_scale,
            placement=placement,
        )
    _, out_size = io_shapes(config)
    image_shape = IMAGE_SHAPES.get(config.dataset)
    return convert(
        model,
        config.rule,
        key=key,
        feedback_scale=config.feedback_scale,
        error_features=out_size,
        input_shape=None if config.model == "mlp" else image_shape,
    )


def initial_model(
    config: TrainConfig,
    key: PRNGKeyArray,
    model: Any,
    state: Any,
    vocab_size: int | None = None,
) -> tuple[Any, Any]:
    """The run's initial model and state: built from the configuration with `key`
    (and for the Transformer the corpus' `vocab_size`), or the custom model passed
    (as built, with its feedback)."""
    if config.model == "custom":
        return _split_state(model, state)
    return build_model(config, key, vocab_size)


def check_custom(config: TrainConfig, model: Any) -> None:
    """A model is passed exactly for `model="custom"`, and it uses the rule."""
    if config.model != "custom":
        if model is not None:
            raise ConfigError(
                "model",
                f"must be 'custom' to train the model passed, got {config.model!r}.",
            )
        return
    if model is None:
        raise ConfigError(
            "model",
            "'custom' trains a model of your own: pass it to bfx.train(config, "
            "model=...) (from Python).",
        )
    if not linear_layers(model):
        raise ValueError("the model passed has no linear layers to train.")
    found = rule_of(model)
    if found != config.rule and not (config.rule == "dfa" and isinstance(model, DFA)):
        raise ConfigError(
            "rule",
            f"is {config.rule!r}, but the model passed is built with "
            f"{'mixed rules' if found is None else repr(found)}: convert it with "
            f"bfx.convert(model, {config.rule!r}, ...) first.",
        )


def image_input(config: TrainConfig, model: Any) -> tuple[int, ...] | None:
    """The image shape `(C, H, W)` that the model takes, or `None` for flat vectors:
    the conv nets take images; a custom model does on an image data set if its
    first linear layer is not dense."""
    if config.model in _CONV_NETS:
        return IMAGE_SHAPES[config.dataset]
    if config.model == "custom" and config.dataset in IMAGE_SHAPES:
        first = linear_layers(convert(model, "bp"))[0]
        return (
            None if isinstance(first, eqx.nn.Linear) else IMAGE_SHAPES[config.dataset]
        )
    return None
