"""The run's two compiled calls per epoch: the training epoch (a `lax.scan` of steps,
[`bioflax_eqx.train_epoch_with_state`][]) and the evaluation of the splits with the
alignment metrics. Both are compiled once per program: runs that differ only in
where they read and write, their seed or (for a constant schedule) their length
share them."""

import collections
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, PRNGKeyArray, PyTree

from .._lowering import im2col_layers, lowering
from .._metrics import alignment_metrics
from ..data import IMAGE_SHAPES, Dataset, augment_images, epoch_windows
from ..models import BATCH_AXIS
from ._build import image_input
from ._config import TrainConfig
from ._epoch import train_epoch_with_state
from ._losses import hits, loss_for
from ._mesh import DATA_AXIS, replicated
from ._optimizer import mirror_step, optimizer


# How often each compiled function was traced (read by the tests: no retracing).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the compiled functions need besides the arrays (hashed, static)."""

    config: TrainConfig
    image_shape: tuple[int, ...] | None  # the model's input shape, if images
    stateful: bool
    mesh: Mesh | None = None  # data parallel over it, or one device


def make_setup(
    config: TrainConfig, model: Any, state: Any, mesh: Mesh | None = None
) -> Setup:
    """The configuration with the fields that do not change the compiled programs
    reset, so that runs differing only in them share the programs."""
    epochs = config.epochs if config.schedule == "cosine" else 1
    # (`text` needs some `data_dir`: any one stands for all.)
    data_dir = "" if config.dataset == "text" else None
    key = dataclasses.replace(
        config, out=None, data_dir=data_dir, seed=0, epochs=epochs
    )
    return Setup(key, image_input(config, model), state is not None, mesh)


class _Applied(eqx.Module):
    """A model as the trainer calls it on one stored (flat) example: reshaped to
    its image, and with a fixed state (in inference mode) for models with state.
    Used for evaluation and the alignment metrics, which call `model(x, key=key)`."""

    model: Any
    state: Any
    image_shape: tuple[int, ...] | None = eqx.field(static=True)

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        if self.image_shape is not None:
            x = x.reshape(self.image_shape)
        if self.state is None:
            return self.model(x, key=key)
        return self.model(x, self.state, key=key)[0]


def step_loss(setup: Setup):
    """The loss of one minibatch for
    [`train_epoch_with_state`][bioflax_eqx.train_epoch_with_state], with its
    accuracy (zero for regression) as the auxiliary output."""
    config = setup.config
    loss_fn = loss_for(config)

    def step_loss(model, state, x, y, key):
        if config.augment != "none":
            augment_key, key = jax.random.split(key)
            x = augment_images(
                augment_key,
                x,
                IMAGE_SHAPES[config.dataset],
                pad=config.augment_pad,
                flip=config.augment == "shift-flip",
            )
        if setup.image_shape is not None:
            x = x.reshape(x.shape[0], *setup.image_shape)
        # brSF draws one feedback matrix per step: the key is shared by the batch.
        if state is None:
            outputs = jax.vmap(lambda xi: model(xi, key=key))(x)
        else:
            # Batch norm: statistics over the minibatch, running averages updated.
            outputs, state = jax.vmap(
                lambda xi, s: model(xi, s, key=key),
                axis_name=BATCH_AXIS,
                in_axes=(0, None),
                out_axes=(0, None),
            )(x, state)
        loss = jnp.mean(jax.vmap(loss_fn)(outputs, y))
        acc = jnp.mean(hits(outputs, y)) if config.classification else jnp.zeros(())
        return loss, (acc, state)

    return step_loss


def _all_finite(tree: PyTree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


# The training-loss curve of an epoch (`train_loss_curve` in `metrics.jsonl`): the
# mean loss over each of this many consecutive, equal stretches of its steps.
CURVE_POINTS = 32


def loss_curve(losses: Array, points: int = CURVE_POINTS) -> Array:
    """The mean of `losses` (one per step) over `min(points, steps)` consecutive
    stretches of steps, the first `steps % points` of them one step longer."""
    steps = losses.shape[0]
    n = min(points, steps)
    ends = list(itertools.accumulate(steps // n + (i < steps % n) for i in range(n)))
    return jnp.stack([jnp.mean(losses[a:b]) for a, b in zip([0, *ends], ends)])


@eqx.filter_jit
def train_epoch(params, state, opt_state, x, y, key, static, setup: Setup):
    """One epoch ([`train_epoch_with_state`][bioflax_eqx.train_epoch_with_state]),
    its mean loss and accuracy, its loss curve (`loss_curve`), and whether the
    losses and parameters stayed finite; data-parallel over `setup.mesh` if there
    is one. For text, `x` is the training text's ids (`y` is `None`), cut into
    random windows here."""
    TRACE_COUNTS["epoch"] += 1
    config = setup.config
    shuffle = config.shuffle
    if config.text:
        window_key, key = jax.random.split(key)
        x, y = epoch_windows(window_key, x, config.context, config.batch_size)
        x, y = x.reshape(-1, config.context), y.reshape(-1, config.context)
        shuffle = False  # the windows come in a random order already
    params, state, opt_state, losses, acc = train_epoch_with_state(
        params,
        static,
        state,
        opt_state,
        x,
        y,
        key,
        optimizer=optimizer(setup.config),
        loss_fn=step_loss(setup),
        batch_size=setup.config.batch_size,
        after_step=mirror_step(setup.config),
        mesh=setup.mesh,
        conv_path=setup.config.conv_path,  # pyright: ignore[reportArgumentType]
        shuffle=shuffle,
    )
    finite = jnp.all(jnp.isfinite(losses)) & _all_finite(params)
    loss, acc = jnp.mean(losses), jnp.mean(acc)
    return params, state, opt_state, loss, acc, loss_curve(losses), finite


# Examples per evaluation chunk: bounds the memory of conv nets on big test sets.
_EVAL_CHUNK = 1000
# With convolutions as slices and one `dot` (CPU), the slices of 1000 images fall out
# of the caches: chunks of 128 evaluated LeNet-5 on 15,000 images 1.9x faster
# (one thread, 0.95 s against 1.81 s).
_IM2COL_EVAL_CHUNK = 128


def map_examples(
    fn: Callable, xs: PyTree, mesh: Mesh | None, chunk: int = _EVAL_CHUNK
) -> PyTree:
    """`lax.map(fn, xs, batch_size=chunk)` over the examples (first axis) of `xs`;
    with a mesh, each chunk is split over its devices (the chunk rounded up to a
    multiple of them; the remainder runs whole on every device)."""
    if mesh is None:
        return jax.lax.map(fn, xs, batch_size=chunk)
    chunk = -(-chunk // mesh.size) * mesh.size
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    main = n - n % chunk
    split = NamedSharding(mesh, P(DATA_AXIS))

    def one_chunk(part):
        part = jax.lax.with_sharding_constraint(part, split)
        return jax.vmap(fn)(part)

    parts = []
    if main > 0:
        chunks = jax.tree_util.tree_map(
            lambda a: a[:main].reshape(-1, chunk, *a.shape[1:]), xs
        )
        out = jax.lax.map(one_chunk, chunks)
        parts.append(jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), out))
    if main < n:
        parts.append(jax.vmap(fn)(jax.tree_util.tree_map(lambda a: a[main:], xs)))
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)


@eqx.filter_jit
def evaluate(params, state, splits, fixed_x, fixed_y, key, static, setup: Setup):
    """Loss (and accuracy) on each `(x, y)` of `splits`, and the alignment metrics on
    the fixed batch: one compiled call per epoch, outside the training scan.
    Batch norm in inference mode (its running statistics). With a mesh, the splits
    are evaluated data-parallel, the metrics' fixed batch whole on every device."""
    TRACE_COUNTS["evaluate"] += 1
    config = setup.config
    loss_fn = loss_for(config)
    model = eqx.combine(params, static)
    if state is not None:
        model = eqx.nn.inference_mode(model)
    applied = _Applied(model, state, setup.image_shape)
    # The splits are evaluated in a `lax.map` over chunks: a loop, like the epoch.
    lower, _ = lowering(config.conv_path, model, setup.mesh)
    lowered = _Applied(lower(model), state, setup.image_shape)
    chunk = _IM2COL_EVAL_CHUNK if lower is im2col_layers else _EVAL_CHUNK
    results = []
    for x, y in splits:

        def one(xy):
            output = lowered(xy[0], key=key)
            return loss_fn(output, xy[1]), output

        losses, outputs = map_examples(one, (x, y), setup.mesh, chunk)
        acc = jnp.mean(hits(outputs, y)) if config.classification else None
        results.append((jnp.mean(losses), acc))
    alignment = alignment_metrics(applied, fixed_x, fixed_y, loss_fn, key=key)
    return results, alignment


def evaluation_data(
    config: TrainConfig, data: Dataset, key: PRNGKeyArray, mesh: Mesh | None
) -> tuple[list[str], list[tuple[Array, Array]], tuple[Array, Array], PRNGKeyArray]:
    """The names and arrays of the splits evaluated each epoch (those not empty),
    the fixed batch of the alignment metrics and their key, on the devices."""
    splits = {"val": data.val, "test": data.test}
    splits = {name: s for name, s in splits.items() if s.x.shape[0] > 0}
    arrays = [replicated((s.x, s.y), mesh) for s in splits.values()]
    # A fixed batch for the metrics, so that epochs are comparable.
    source = data.val if data.val.x.shape[0] > 0 else data.train
    fixed = (source.x[: config.metrics_batch], source.y[: config.metrics_batch])
    fixed, key = replicated((fixed, key), mesh)
    return list(splits), arrays, fixed, key
