"""The run's optimiser: the learning-rate schedule, the optax transformation, which
arrays it trains, and the weight mirror's step after it (rule `wm`)."""

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import optax
from jaxtyping import PRNGKeyArray, PyTree

from .._mirror import mirror
from .._optim import decay_mask, freeze_feedback, tie_feedback, trainable
from .._rules import WM
from ._config import TrainConfig


_MOMENTUM = 0.9


def schedule(config: TrainConfig) -> optax.Schedule:
    """The learning rate at each step: warm-up, then constant or cosine decay."""
    steps = config.steps_per_epoch
    warmup = config.warmup_epochs * steps
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, config.epochs * steps - warmup)
    else:
        main = optax.constant_schedule(config.lr)
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(0.0, config.lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def _is_bias(params: PyTree) -> PyTree:
    """`True` at the arrays named `bias` (of any layer), `False` elsewhere."""

    def is_bias(path, _):
        last = path[-1]
        return isinstance(last, jax.tree_util.GetAttrKey) and last.name == "bias"

    return jax.tree_util.tree_map_with_path(is_bias, params)


def _own(config: TrainConfig) -> optax.GradientTransformation:
    """The optimiser of every trained array, KP's feedback included."""
    lr = schedule(config)
    if config.optimizer == "adamw":
        inner = optax.adamw(lr, weight_decay=config.weight_decay, mask=decay_mask)
    else:
        if config.optimizer == "adam":
            inner = optax.adam(lr)
        else:
            momentum = _MOMENTUM if config.optimizer == "momentum" else None
            inner = optax.sgd(lr, momentum=momentum)
        if config.weight_decay > 0:
            # Before the learning-rate scale, so Kolen-Pollack's W - B shrinks by
            # (1 - lr * decay) per step (chained after, it would grow).
            decay = optax.add_decayed_weights(config.weight_decay, mask=decay_mask)
            inner = optax.chain(decay, inner)
    if config.bias_lr_scale != 1:
        bias_scale = optax.scale(config.bias_lr_scale)
        inner = optax.chain(optax.masked(bias_scale, _is_bias), inner)
    return inner


def _tied(config: TrainConfig) -> bool:
    # Without decay every update of `_own` depends only on the array's gradients,
    # and KP's B has W's: B takes W's update, computed once (the same, bit for bit).
    return config.rule == "kp" and config.weight_decay == 0


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optimiser of `partition(model)[0]`, with weight decay where set and the
    biases' updates scaled by `bias_lr_scale`."""
    inner = _own(config)
    # The trainer optimises `partition(model)`: fixed feedback never reaches the
    # optimiser, so it needs no freezing, except WM's, which the mirror moves.
    if config.rule == "wm":
        return freeze_feedback(inner)
    return tie_feedback(inner) if _tied(config) else inner


# Where `tie_feedback` (a `optax.multi_transform`) keeps the state of every array
# but KP's feedback.
_OWN_STATE = ".inner_states['own'].inner_state"


def untied_state(config: TrainConfig, params: PyTree) -> PyTree | None:
    """The optimiser state a KP run without decay had before its feedback took its
    weight's update (checkpoints written before `tie_feedback`), as the structure to
    read such a checkpoint into; `None` for every other run (its layout is today's).
    """
    return _own(config).init(params) if _tied(config) else None


def tie_state(untied: PyTree, like: PyTree) -> PyTree:
    """The state `untied` (see `untied_state`) in today's layout, `like`: the same
    arrays, without the feedback's copies of its weight's moments."""
    arrays = {
        jax.tree_util.keystr(path): x
        for path, x in jax.tree_util.tree_flatten_with_path(untied)[0]
    }

    def pick(path, _):
        key = jax.tree_util.keystr(path)
        assert key.startswith(_OWN_STATE), key
        return arrays[key.removeprefix(_OWN_STATE)]

    return jax.tree_util.tree_map_with_path(pick, like)


def partition(model: PyTree) -> tuple[PyTree, PyTree]:
    """`eqx.partition(model, trainable(model))`, with WM's feedback on the trained
    side too: the mirror step changes it inside the epoch's scan."""

    def spec(x):
        if isinstance(x, WM):
            return jax.tree_util.tree_map(eqx.is_inexact_array, x)
        return trainable(x)

    spec = jax.tree_util.tree_map(spec, model, is_leaf=lambda x: isinstance(x, WM))
    return eqx.partition(model, spec)


def mirror_step(
    config: TrainConfig,
) -> Callable[[PyTree, PRNGKeyArray], PyTree] | None:
    """The weight mirror's step with the run's settings, for rule `wm`."""
    if config.rule != "wm":
        return None
    return functools.partial(
        mirror,
        lr=config.mirror_lr,
        noise_std=config.mirror_noise,
        decay=config.mirror_decay,
        batch_size=config.mirror_batch,
    )
