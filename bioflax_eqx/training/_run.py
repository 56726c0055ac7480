"""Training runs: one compiled call per epoch, alignment metrics once per epoch,
checkpoints after every epoch, bit-identical resume.

A run is a pure function of its [`TrainConfig`][bioflax_eqx.TrainConfig]: every random
choice (validation split, initial weights, feedback, batch order, augmentation,
brSF's draws) comes from `jax.random.key(config.seed)`, whatever the number of
devices it runs on (data-parallel over a mesh of them, with JAX's sharding).
"""

import collections
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .._convert import convert
from .._dfa import DFA
from .._layers import linear_layers, rule_of
from .._lowering import lowering
from .._metrics import alignment_metrics
from .._mirror import mirror
from .._optim import decay_mask, feedback_labels, freeze_feedback, trainable
from .._rules import RULES, WM
from ..data import (
    DataNotFoundError,
    Dataset,
    augment_images,
    load_dataset,
    sine,
    teacher_student,
)
from ._checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write,
    load_state,
    read_header,
    save_checkpoint,
)
from ._config import (
    ACTIVATIONS,
    IMAGE_SHAPES,
    IMAGE_SIZES,
    TEACHER,
    ConfigError,
    TrainConfig,
    check_choice,
    io_shapes,
)
from ._epoch import train_epoch_with_state
from ._models import BATCH_AXIS, lenet, mlp, resnet20, vgg
from ._plots import plot_alignment, plot_comparison, plot_learning_curves


_MOMENTUM = 0.9

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CURVES_NAME = "learning_curves.png"
ALIGNMENT_NAME = "alignment.png"
COMPARISON_NAME = "comparison.json"
COMPARISON_PLOT_NAME = "comparison.png"
_RUN_FILES = (CONFIG_NAME, CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME)
_ALL_RUN_FILES = (*_RUN_FILES, CURVES_NAME, ALIGNMENT_NAME)

# Fields that may differ between a checkpoint and the run resuming it: where things
# are and run, and (for a constant schedule) how many epochs to run in all.
_RELOCATABLE = ("data_dir", "out", "devices")
# The name of the one axis of the trainer's device mesh.
DATA_AXIS = "data"

# How often each compiled function was traced (read by the tests: no retracing).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class DivergedError(FloatingPointError):
    """The loss or the parameters became NaN or infinite; training stopped and the
    last good checkpoint was kept."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What [`bioflax_eqx.train`][] returns.

    **Fields:**

    - `config`: the run's configuration.
    - `model`: the trained model (for `model="mlp"` a [`bioflax_eqx.MLP`][], for the
        conv nets the converted `eqx.nn.Sequential` or [`bioflax_eqx.Sequential`][],
        for `"custom"` the model passed in, trained).
    - `state`: the model's `eqx.nn.State` (batch norm's statistics), or `None` for
        a model without state.
    - `history`: one dict per epoch, the lines of `metrics.jsonl`.
    - `summary`: the contents of `summary.json`.
    """

    config: TrainConfig
    model: Any
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    state: Any = None


# ------------------------------------------------------------- optional extras


def _available(module: str) -> bool:
    # `sys.modules[name] = None` (how the tests hide a package) means "not there".
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_NOTICES: set[str] = set()


def _notice(message: str) -> None:
    """Prints `message` to stderr once per process."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"bioflax-eqx: {message}", file=sys.stderr)


def _plots_available() -> bool:
    if _available("matplotlib"):
        return True
    _notice(
        "plots skipped: matplotlib is not installed (pip install 'bioflax_eqx[train]')."
    )
    return False


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed or `quiet` is set."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        del n

    def set_postfix(self, postfix: dict[str, str], refresh: bool = True) -> None:
        del postfix, refresh


def _progress(config: TrainConfig, initial: int, quiet: bool):
    if quiet:
        return _NoBar()
    if not _available("tqdm"):
        _notice(
            "no progress bar: tqdm is not installed (pip install 'bioflax_eqx[train]')."
        )
        return _NoBar()
    # Imported here: tqdm is an optional dependency (the `train` extra). Plain text
    # bars, also in notebooks (tqdm.auto warns there without ipywidgets).
    from tqdm import tqdm

    return tqdm(
        total=config.epochs,
        initial=initial,
        desc=f"{config.rule} {config.model} {config.dataset}",
        unit="epoch",
        dynamic_ncols=True,
    )


# ----------------------------------------------------------------------- the pieces


def _load_data(config: TrainConfig, key: PRNGKeyArray) -> Dataset:
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


def _plain_model(config: TrainConfig, key: PRNGKeyArray) -> Any:
    """The configuration's network, trained by backprop."""
    (in_size,), out_size = io_shapes(config)
    activation = ACTIVATIONS[config.activation]
    if config.model == "mlp":
        return mlp(in_size, out_size, config.width, config.depth, activation, key=key)
    builders = {"lenet": lenet, "vgg": vgg, "resnet20": resnet20}
    image_shape = IMAGE_SHAPES[config.dataset]
    return builders[config.model](image_shape, out_size, activation, key=key)


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


def _build_model(config: TrainConfig, key: PRNGKeyArray) -> tuple[Any, Any]:
    """The backprop network converted to the rule, so that every rule of a seed
    starts from the same weights and biases (and FA, KP, DFA and frSF from the same
    draw of feedback, where the shapes agree); and its state (batch norm), or
    `None`."""
    init_key, feedback_key = jax.random.split(key)
    model = _plain_model(config, init_key)
    _, out_size = io_shapes(config)
    if config.rule != "bp":
        image_shape = IMAGE_SHAPES.get(config.dataset)
        model = convert(
            model,
            config.rule,
            key=feedback_key,
            feedback_scale=config.feedback_scale,
            error_features=out_size,
            input_shape=None if config.model == "mlp" else image_shape,
        )
    return _split_state(model)


def _check_custom(config: TrainConfig, model: Any) -> None:
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


def _takes_images(config: TrainConfig, model: Any) -> bool:
    """Whether the model takes images `(C, H, W)` (else flat vectors): the conv nets
    do; a custom model does on an image data set if its first linear layer is not
    dense."""
    if config.model in ("lenet", "vgg", "resnet20"):
        return True
    if config.model == "custom" and config.dataset in IMAGE_SHAPES:
        return not isinstance(linear_layers(convert(model, "bp"))[0], eqx.nn.Linear)
    return False


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What the compiled functions need besides the arrays (hashed, static)."""

    config: TrainConfig
    image_shape: tuple[int, ...] | None  # the model's input shape, if images
    stateful: bool
    mesh: Mesh | None = None  # data parallel over it, or one device


def _setup(
    config: TrainConfig, model: Any, state: Any, mesh: Mesh | None = None
) -> _Setup:
    """The configuration with the fields that do not change the compiled programs
    reset, so that runs differing only in them share the programs."""
    epochs = config.epochs if config.schedule == "cosine" else 1
    key = dataclasses.replace(config, out=None, data_dir=None, seed=0, epochs=epochs)
    image_shape = IMAGE_SHAPES[config.dataset] if _takes_images(config, model) else None
    return _Setup(key, image_shape, state is not None, mesh)


# ----------------------------------------------------------------- many devices


def _mesh(config: TrainConfig) -> Mesh | None:
    """The mesh of `config.devices` local devices of every process, one axis
    (`DATA_AXIS`), or `None` for one device in one process (no sharding at all).
    Refuses a count this process does not have, and a batch that the devices of
    all processes do not divide."""
    local = jax.local_devices()
    if config.devices > len(local):
        simulate = (
            "; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{config.devices} simulates them"
            if local[0].platform == "cpu"
            else ""
        )
        raise ConfigError(
            "devices",
            f"asks for {config.devices} devices, but this process has "
            f"{len(local)} ({local[0].platform}){simulate}.",
        )
    processes = jax.process_count()
    if config.devices == 1 and processes == 1:
        return None
    total = config.devices * processes
    if config.batch_size % total != 0:
        raise ConfigError(
            "batch_size",
            f"must be a multiple of the {total} devices ({config.devices} in each "
            f"of {processes} processes): each device takes an equal part of every "
            f"batch; got {config.batch_size}.",
        )
    # The same count from each process, in process order: every process builds the
    # same mesh.
    devices = []
    for process in range(processes):
        own = [d for d in jax.devices() if d.process_index == process]
        devices += own[: config.devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def _replicated(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """The arrays of `tree` whole on every device of `mesh` (unchanged without one).

    Every process holds the same values (the same data set and model from the same
    seed, or the same checkpoint) and builds its own devices' copies from its own:
    nothing is sent between processes (`jax.device_put` would first check that
    they agree, by gathering every process's copy of the data set)."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, P())

    def place(x):
        if not eqx.is_array(x):
            return x
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x  # already there: the outputs of the last epoch
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(place, tree)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-host run)."""
    return jax.process_index() == 0


def _schedule(config: TrainConfig) -> optax.Schedule:
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


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    lr = _schedule(config)
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
    # The trainer optimises `_partition(model)`: fixed feedback never reaches the
    # optimiser, so it needs no freezing, except WM's, which the mirror moves.
    return freeze_feedback(inner) if config.rule == "wm" else inner


def _partition(model: PyTree) -> tuple[PyTree, PyTree]:
    """`eqx.partition(model, trainable(model))`, with WM's feedback on the trained
    side too: the mirror step changes it inside the epoch's scan."""

    def spec(x):
        if isinstance(x, WM):
            return jax.tree_util.tree_map(eqx.is_inexact_array, x)
        return trainable(x)

    spec = jax.tree_util.tree_map(spec, model, is_leaf=lambda x: isinstance(x, WM))
    return eqx.partition(model, spec)


def _cross_entropy(
    logits: Float[Array, " classes"], label: Int[Array, ""]
) -> Float[Array, ""]:
    return jax.nn.logsumexp(logits) - logits[label]


def _squared_error(
    output: Float[Array, " outputs"], target: Float[Array, " outputs"]
) -> Float[Array, ""]:
    return jnp.mean(jnp.square(output - target))


def _loss_fn(config: TrainConfig) -> Callable[[Array, Array], Array]:
    return _cross_entropy if config.classification else _squared_error


def _hits(outputs: Array, labels: Array) -> Float[Array, " batch"]:
    return (jnp.argmax(outputs, axis=-1) == labels).astype(jnp.float32)


def _all_finite(tree: PyTree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


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


def _step_loss(setup: _Setup):
    """The loss of one minibatch for
    [`train_epoch_with_state`][bioflax_eqx.train_epoch_with_state], with its
    accuracy (zero for regression) as the auxiliary output."""
    config = setup.config
    loss_fn = _loss_fn(config)

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
        hits = jnp.mean(_hits(outputs, y)) if config.classification else jnp.zeros(())
        return loss, (hits, state)

    return step_loss


def _mirror_step(
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


@eqx.filter_jit
def _train_epoch(params, state, opt_state, x, y, key, static, setup: _Setup):
    """One epoch ([`train_epoch_with_state`][bioflax_eqx.train_epoch_with_state]),
    its mean loss and accuracy, and whether the losses and parameters stayed
    finite; data-parallel over `setup.mesh` if there is one."""
    TRACE_COUNTS["epoch"] += 1
    params, state, opt_state, losses, hits = train_epoch_with_state(
        params,
        static,
        state,
        opt_state,
        x,
        y,
        key,
        optimizer=_optimizer(setup.config),
        loss_fn=_step_loss(setup),
        batch_size=setup.config.batch_size,
        after_step=_mirror_step(setup.config),
        mesh=setup.mesh,
        conv_path=setup.config.conv_path,  # pyright: ignore[reportArgumentType]
    )
    finite = jnp.all(jnp.isfinite(losses)) & _all_finite(params)
    return params, state, opt_state, jnp.mean(losses), jnp.mean(hits), finite


# Examples per evaluation chunk: bounds the memory of conv nets on big test sets.
_EVAL_CHUNK = 1000


def _map_examples(fn: Callable, xs: PyTree, mesh: Mesh | None) -> PyTree:
    """`lax.map(fn, xs, batch_size=_EVAL_CHUNK)` over the examples (first axis) of
    `xs`; with a mesh, each chunk is split over its devices (the chunk rounded up to
    a multiple of them; the remainder runs whole on every device)."""
    if mesh is None:
        return jax.lax.map(fn, xs, batch_size=_EVAL_CHUNK)
    chunk = -(-_EVAL_CHUNK // mesh.size) * mesh.size
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
def _evaluate(params, state, splits, fixed_x, fixed_y, key, static, setup: _Setup):
    """Loss (and accuracy) on each `(x, y)` of `splits`, and the alignment metrics on
    the fixed batch: one compiled call per epoch, outside the training scan.
    Batch norm in inference mode (its running statistics). With a mesh, the splits
    are evaluated data-parallel, the metrics' fixed batch whole on every device."""
    TRACE_COUNTS["evaluate"] += 1
    config = setup.config
    loss_fn = _loss_fn(config)
    model = eqx.combine(params, static)
    if state is not None:
        model = eqx.nn.inference_mode(model)
    applied = _Applied(model, state, setup.image_shape)
    # The splits are evaluated in a `lax.map` over chunks: a loop, like the epoch.
    lower, _ = lowering(config.conv_path, model, setup.mesh)
    lowered = _Applied(lower(model), state, setup.image_shape)
    results = []
    for x, y in splits:

        def one(xy):
            output = lowered(xy[0], key=key)
            return loss_fn(output, xy[1]), output

        losses, outputs = _map_examples(one, (x, y), setup.mesh)
        acc = jnp.mean(_hits(outputs, y)) if config.classification else None
        results.append((jnp.mean(losses), acc))
    alignment = alignment_metrics(applied, fixed_x, fixed_y, loss_fn, key=key)
    return results, alignment


def _json_float(value: Any) -> float | None:
    """A JSON-ready float; NaN and infinities (e.g. the angle to a zero gradient)
    become null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _write_json(path: pathlib.Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def _write_history(out: pathlib.Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole (atomically) each epoch, so it always matches the checkpoint.
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in history)
    atomic_write(out / METRICS_NAME, lines.encode())


def _has_run(folder: pathlib.Path) -> bool:
    # config.json alone is a run stopped before its first checkpoint: nothing to
    # resume, so a fresh run may replace it.
    return any((folder / name).exists() for name in _RUN_FILES if name != CONFIG_NAME)


def _prepare_fresh(out: pathlib.Path, overwrite: bool) -> None:
    if _has_run(out):
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a run; pass --resume (resume=True) to continue "
                "it or --overwrite (overwrite=True) to replace it."
            )
        for name in _ALL_RUN_FILES:
            (out / name).unlink(missing_ok=True)


def _check_resumable(config: TrainConfig, header: dict[str, Any], out: pathlib.Path):
    try:
        saved = TrainConfig.from_dict(header["config"])
        epoch = header["epoch"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"the checkpoint in {out} has an unreadable configuration ({e})."
        ) from e
    differences = [
        f"{f.name}={getattr(saved, f.name)!r} there, {getattr(config, f.name)!r} here"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in (*_RELOCATABLE, "epochs")
        and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if differences:
        raise CheckpointError(
            f"the checkpoint in {out} was written by a different configuration "
            f"({'; '.join(differences)}); resume with the same options, or start a "
            "fresh run elsewhere."
        )
    if config.epochs < epoch:
        raise CheckpointError(
            f"the checkpoint in {out} is at epoch {epoch}, past epochs={config.epochs}."
        )
    if config.epochs != saved.epochs and config.schedule != "constant":
        raise CheckpointError(
            f"the {config.schedule} schedule of the run in {out} depends on its "
            f"length (epochs={saved.epochs}); it cannot be changed on resume."
        )


def _n_params(model: PyTree) -> tuple[int, int]:
    """Trainable parameters, and fixed feedback parameters."""
    params = eqx.filter(model, eqx.is_inexact_array)
    counts = collections.Counter()
    for label, x in zip(
        jax.tree_util.tree_leaves(feedback_labels(model)),
        jax.tree_util.tree_leaves(params),
    ):
        counts[label] += x.size
    return counts["trainable"], counts["fixed"]


def _summary(
    config: TrainConfig, model: Any, history: list[dict[str, Any]]
) -> dict[str, Any]:
    final = history[-1]
    trainable, fixed = _n_params(model)
    summary = {
        "status": "completed",
        "rule": config.rule,
        "model": config.model,
        "dataset": config.dataset,
        "epochs": final["epoch"],
        "final": final,
        # The first epoch after a start or resume includes compilation.
        "time_per_epoch_s": statistics.median(r["train_time_s"] for r in history),
        "total_time_s": final["wall_time_s"],
        "n_params": trainable,
        "n_fixed_feedback_params": fixed,
    }
    val = [r for r in history if r.get("val_acc") is not None]
    if val:
        best = max(val, key=lambda r: r["val_acc"])
        summary["best_epoch"], summary["best_val_acc"] = best["epoch"], best["val_acc"]
    return summary


def _finish(
    config: TrainConfig,
    out: pathlib.Path | None,
    model: Any,
    state: Any,
    history: list[dict[str, Any]],
) -> TrainResult:
    summary = _summary(config, model, history)
    if out is not None:
        _write_json(out / SUMMARY_NAME, summary)
        if _plots_available():
            title = f"{config.rule} {config.model} on {config.dataset}"
            plot_learning_curves(history, out / CURVES_NAME, title)
            plot_alignment(history, out / ALIGNMENT_NAME, title)
    return TrainResult(config, model, history, summary, state)


# ------------------------------------------------------------------------- the runs


def _initial(
    config: TrainConfig, model_key: PRNGKeyArray, model: Any, state: Any
) -> tuple[Any, Any]:
    """The run's initial model and state: built from the configuration, or the
    custom model passed (as built, with its feedback)."""
    if config.model == "custom":
        return _split_state(model, state)
    return _build_model(config, model_key)


def train(
    config: TrainConfig,
    *,
    model: Any = None,
    state: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Trains the configuration's network (or a model of your own) with its rule.

    Each epoch is one compiled call (a `lax.scan` over the shuffled minibatches, on
    device, with batch norm's state carried through and, for CIFAR-10, each
    minibatch augmented); then the validation and test splits are evaluated (batch
    norm in inference mode) and the alignment metrics
    ([`bioflax_eqx.alignment_metrics`][]) computed on a fixed batch. With
    `config.out` set, every epoch also writes a checkpoint (parameters, state,
    optimiser state, RNG) and `metrics.jsonl`, and the end of the run
    `summary.json` and two plots (when matplotlib is installed; all described on
    the Training page of this site).

    With `config.devices > 1`, or in a multi-host run (after
    `jax.distributed.initialize()`), training and evaluation run data-parallel: each
    batch is split over the devices, the model, optimiser and batch-norm state
    replicated (the Many devices page). Only process 0 writes `config.out`.

    ```python
    net = eqx.nn.Sequential([
        eqx.nn.Conv2d(1, 8, 3, key=k1), eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(8 * 26 * 26, 10, key=k2),
    ])
    net = bfx.convert(net, "fa", key=k3)
    config = bfx.TrainConfig(rule="fa", model="custom", dataset="mnist", epochs=1)
    result = bfx.train(config, model=net)
    ```

    **Arguments:**

    - `config`: the run.
    - `model`: with `config.model="custom"`, the model to train, as built: any
        Equinox model that the rule's mechanism supports, already using
        `config.rule` (e.g. from [`bioflax_eqx.convert`][]; for `"bp"`, plain
        layers). It is called per example as `model(x, key=key)`, or
        `model(x, state, key=key) -> (y, state)` if it has state (batch norm with
        `axis_name="batch"`, the name of the trainer's vmapped axis). On an image
        data set it gets images `(C, H, W)` if its first linear layer is a
        convolution, else flat vectors. Pass the same model to resume (and to
        [`bioflax_eqx.load_run`][]).
    - `state`: the custom model's `eqx.nn.State`, if it has state and was made
        with `eqx.nn.make_with_state` (else it is read off the model).
    - `resume`: continue from the checkpoint in `config.out`. The configuration must
        match the checkpoint's, except `data_dir`, `out`, `devices`, and `epochs`
        (which may grow, for a constant schedule). The finished run is
        bit-identical to one that was never interrupted on the same number of
        devices (on another, equal up to the order of the gradient sums).
    - `overwrite`: replace a run already in `config.out`; without it (or `resume`)
        such a folder is refused. A folder holding only `config.json` (a run
        stopped before its first checkpoint) holds no run.
    - `quiet`: no progress bar.
    - `callback`: called with each epoch's metrics after its checkpoint is written.

    **Returns:**

    A [`TrainResult`][bioflax_eqx.TrainResult].

    **Raises:**

    [`ConfigError`][bioflax_eqx.ConfigError] (e.g. more `devices` than this
    process has), `FileExistsError` (a run is in the way),
    [`CheckpointError`][bioflax_eqx.CheckpointError] (nothing to resume, a damaged
    checkpoint or another configuration's),
    [`DataNotFoundError`][bioflax_eqx.DataNotFoundError], all before any training;
    [`DivergedError`][bioflax_eqx.DivergedError] when the loss becomes NaN or
    infinite, keeping the last good checkpoint.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}.")
    _check_custom(config, model)
    mesh = _mesh(config)
    out = None if config.out is None else pathlib.Path(config.out)
    header, payload = None, b""
    if resume:
        if out is None:
            raise ConfigError("out", "must be set to resume a run.")
        header, payload = read_header(out)
        _check_resumable(config, header, out)
    elif out is not None and is_primary():
        _prepare_fresh(out, overwrite)
    # optax's Adam mixes a float with its int32 step count: standard promotion, so
    # that training works whatever the caller's setting (the arrays are float32).
    with jax.numpy_dtype_promotion("standard"):
        return _run(config, out, header, payload, quiet, callback, model, state, mesh)


def _run(
    config: TrainConfig,
    out: pathlib.Path | None,
    header: dict[str, Any] | None,
    payload: bytes,
    quiet: bool,
    callback: Callable[[dict[str, Any]], None] | None,
    custom: Any,
    custom_state: Any,
    mesh: Mesh | None,
) -> TrainResult:
    data_key, model_key, train_key, metrics_key = jax.random.split(
        jax.random.key(config.seed), 4
    )
    model, state = _initial(config, model_key, custom, custom_state)
    params, static = _partition(model)
    optimizer = _optimizer(config)
    opt_state = optimizer.init(params)
    rng = train_key
    history: list[dict[str, Any]] = []
    elapsed = 0.0
    # Only process 0 of a multi-host run writes; every process reads to resume.
    writes = out if is_primary() else None
    if header is not None and out is not None:
        like = (params, opt_state, jax.random.key_data(rng), state)
        params, opt_state, rng_data, state = load_state(out, payload, like)
        rng = jax.random.wrap_key_data(rng_data)
        history = list(header["history"])
        elapsed = float(header["elapsed_s"])
        if writes is not None:
            _write_history(writes, history)
            if not quiet:
                print(
                    f"bioflax-eqx: resuming {out} from epoch {len(history)}.",
                    file=sys.stderr,
                )
    start = len(history)
    if start == config.epochs:  # resuming a finished run
        if writes is not None:
            _write_json(writes / CONFIG_NAME, config.to_dict())
        return _finish(config, writes, eqx.combine(params, static), state, history)

    # Before anything is written: a missing data set leaves no folder behind.
    data = _load_data(config, data_key)
    if writes is not None:
        writes.mkdir(parents=True, exist_ok=True)
        _write_json(writes / CONFIG_NAME, config.to_dict())
    if (data.n_features, data.n_outputs) != (
        io_shapes(config)[0][0],
        io_shapes(config)[1],
    ):
        raise RuntimeError(f"{config.dataset} does not have the expected shapes.")
    setup = _setup(config, model, state, mesh)
    # A fixed batch for the metrics, so that epochs are comparable.
    source = data.val if data.val.x.shape[0] > 0 else data.train
    fixed_x = source.x[: config.metrics_batch]
    fixed_y = source.y[: config.metrics_batch]
    splits = {"val": data.val, "test": data.test}
    splits = {name: s for name, s in splits.items() if s.x.shape[0] > 0}
    schedule = _schedule(config)
    # Data parallel: the model, its state and the optimiser's replicated on every
    # device (whether fresh or from a checkpoint of any device count), and so is
    # the data, of which each device takes its part of every batch.
    params, static, opt_state, state, fixed_x, fixed_y, metrics_key = _replicated(
        (params, static, opt_state, state, fixed_x, fixed_y, metrics_key), mesh
    )
    train_x, train_y = _replicated((data.train.x, data.train.y), mesh)
    evaluated_splits = [_replicated((s.x, s.y), mesh) for s in splits.values()]

    with _progress(config, start, quiet or writes is None) as bar:
        for epoch in range(start + 1, config.epochs + 1):
            t0 = time.perf_counter()
            rng, epoch_key = jax.random.split(rng)
            new_params, new_state, new_opt_state, loss, acc, finite = _train_epoch(
                params,
                state,
                opt_state,
                train_x,
                train_y,
                _replicated(epoch_key, mesh),
                static,
                setup,
            )
            finite = bool(finite)
            t1 = time.perf_counter()
            if not finite:
                kept = (
                    f"the last good checkpoint (epoch {epoch - 1}) is kept in {out}"
                    if out is not None and epoch > 1
                    else "no checkpoint was written"
                )
                raise DivergedError(
                    f"training diverged in epoch {epoch}: the loss or the parameters "
                    f"became NaN or infinite (mean loss {float(loss)}); {kept}. Try a "
                    "smaller learning rate (--lr)."
                )
            params, state, opt_state = new_params, new_state, new_opt_state
            evaluated, alignment = _evaluate(
                params,
                state,
                evaluated_splits,
                fixed_x,
                fixed_y,
                metrics_key,
                static,
                setup,
            )
            record: dict[str, Any] = {
                "epoch": epoch,
                "lr": _json_float(schedule(epoch * config.steps_per_epoch)),
                "train_loss": _json_float(loss),
                "train_acc": _json_float(acc) if config.classification else None,
            }
            for name, (split_loss, split_acc) in zip(splits, evaluated):
                record[f"{name}_loss"] = _json_float(split_loss)
                record[f"{name}_acc"] = (
                    None if split_acc is None else _json_float(split_acc)
                )
            record.update({k: _json_float(v) for k, v in alignment.items()})
            t2 = time.perf_counter()
            elapsed += t2 - t0
            record.update(
                train_time_s=t1 - t0, eval_time_s=t2 - t1, wall_time_s=elapsed
            )
            history.append(record)
            if writes is not None:
                checkpoint_header = {
                    "config": config.to_dict(),
                    "epoch": epoch,
                    "elapsed_s": elapsed,
                    "history": history,
                }
                saved = (params, opt_state, jax.random.key_data(rng), state)
                save_checkpoint(writes, checkpoint_header, saved)
                _write_history(writes, history)
            bar.update(1)
            bar.set_postfix(_postfix(record), refresh=True)
            if callback is not None:
                callback(record)
    return _finish(config, writes, eqx.combine(params, static), state, history)


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": "train_loss", "val": "val_acc", "test": "test_acc"}
    if record.get("test_acc") is None:
        shown = {"loss": "train_loss", "val": "val_loss", "test": "test_loss"}
    shown["∠grad"] = "grad_angle/global"
    return {
        label: f"{record[key]:.4g}"
        for label, key in shown.items()
        if record.get(key) is not None
    }


def load_run(
    folder: str | pathlib.Path, *, model: Any = None, state: Any = None
) -> TrainResult:
    """Loads the last checkpoint of a run written by [`bioflax_eqx.train`][].

    **Arguments:**

    - `folder`: the run's output folder.
    - `model`, `state`: for a run of `model="custom"`, the model (and state) that
        was passed to [`bioflax_eqx.train`][]: the structure to load into.

    **Returns:**

    A [`TrainResult`][bioflax_eqx.TrainResult] with the model (and state) as of the
    last completed epoch and the metrics up to it.
    """
    folder = pathlib.Path(folder)
    header, payload = read_header(folder)
    config = TrainConfig.from_dict(header["config"])
    _check_custom(config, model)
    with jax.numpy_dtype_promotion("standard"):
        _, model_key, train_key, _ = jax.random.split(jax.random.key(config.seed), 4)
        initial, state = _initial(config, model_key, model, state)
        params, static = _partition(initial)
        opt_state = _optimizer(config).init(params)
        like = (params, opt_state, jax.random.key_data(train_key), state)
        params, _, _, state = load_state(folder, payload, like)
        trained = eqx.combine(params, static)
    history = list(header["history"])
    summary = _summary(config, trained, history)
    return TrainResult(config, trained, history, summary, state)


def compare(
    config: TrainConfig,
    rules: Sequence[str] = RULES,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, TrainResult]:
    """Trains several rules on the same task with the same seed (so from the same
    initial weights and data order).

    With `config.out` set, rule `r` writes its run to `<out>/<r>/` and the comparison
    goes to `<out>/comparison.json` (one row per rule: final test accuracy and
    loss, alignment angles, time per epoch) and `<out>/comparison.png`.

    **Arguments:**

    - `config`: the run; its `rule` is replaced by each of `rules`.
    - `rules`: the rules to compare (default: all of [`bioflax_eqx.RULES`][]).
    - `resume`: continue each rule's run from its checkpoint, where it has one.
    - `overwrite`: replace runs already in the folders.
    - `quiet`: no progress bars.

    **Returns:**

    A dict from rule to its [`TrainResult`][bioflax_eqx.TrainResult].
    """
    rules = tuple(rules)
    if not rules:
        raise ConfigError("rules", "must name at least one rule.")
    for rule in rules:
        check_choice("rules", rule, RULES)
    if len(set(rules)) != len(rules):
        raise ConfigError("rules", f"must not repeat a rule, got {', '.join(rules)}.")
    out = None if config.out is None else pathlib.Path(config.out)
    configs = {
        rule: dataclasses.replace(
            config, rule=rule, out=None if out is None else str(out / rule)
        )
        for rule in rules
    }
    # Every refusal before any training (by process 0 of a multi-host run, which
    # alone writes, and so may already have started the first run).
    writes = out if is_primary() else None
    resumes = {}
    for rule, cfg in configs.items():
        folder = None if cfg.out is None else pathlib.Path(cfg.out)
        resumes[rule] = (
            resume and folder is not None and (folder / CHECKPOINT_NAME).is_file()
        )
        if writes is not None and not resumes[rule] and not overwrite:
            _prepare_fresh(writes / rule, overwrite=False)
    if writes is not None and not (resume or overwrite):
        if (writes / COMPARISON_NAME).exists():
            raise FileExistsError(
                f"{writes} already holds a comparison; pass --resume or --overwrite."
            )
    results = {
        rule: train(cfg, resume=resumes[rule], overwrite=overwrite, quiet=quiet)
        for rule, cfg in configs.items()
    }
    if writes is not None:
        _write_json(writes / COMPARISON_NAME, comparison_rows(results))
        if _plots_available():
            histories = {rule: r.history for rule, r in results.items()}
            title = f"{config.dataset}, seed {config.seed}"
            plot_comparison(histories, writes / COMPARISON_PLOT_NAME, title)
    return results


def comparison_rows(results: dict[str, TrainResult]) -> list[dict[str, Any]]:
    """One row per rule: final test metrics, alignment angles and time per epoch."""
    rows = []
    for rule, result in results.items():
        final = result.history[-1]
        layers = sorted(
            int(k.split("/")[1])
            for k in final
            if k.startswith("delta_angle/") and not k.endswith("global")
        )
        rows.append(
            {
                "rule": rule,
                "test_acc": final.get("test_acc"),
                "test_loss": final.get("test_loss"),
                "grad_angle": final.get("grad_angle/global"),
                "delta_angles": [final.get(f"delta_angle/{i}") for i in layers],
                "weight_angles": [final.get(f"weight_angle/{i}") for i in layers],
                "time_per_epoch_s": result.summary["time_per_epoch_s"],
            }
        )
    return rows
