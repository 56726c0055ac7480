"""Training runs: one compiled call per epoch, alignment metrics once per epoch,
checkpoints after every epoch, bit-identical resume.

A run is a pure function of its [`TrainConfig`][bioflax_eqx.TrainConfig]: every random
choice (validation split, initial weights, feedback, batch order, brSF's draws) comes
from `jax.random.key(config.seed)`.
"""

import collections
import dataclasses
import json
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write,
    load_state,
    read_header,
    save_checkpoint,
)
from ._convert import convert
from ._data import (
    Dataset,
    epoch_batches,
    load_dataset,
    sine,
    teacher_student,
)
from ._metrics import alignment_metrics
from ._mlp import MLP
from ._optim import decay_mask, feedback_labels, freeze_feedback
from ._plots import plot_alignment, plot_comparison, plot_learning_curves
from ._rules import RULES


DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "teacher_student", "sine")
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
}

# Training and test examples in the MNIST-format files.
_IDX_SIZES = {"mnist": (60_000, 10_000), "fashion_mnist": (60_000, 10_000)}
# The teacher network of `dataset="teacher_student"`: in, out, width, depth.
TEACHER = (32, 4, 64, 2)
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
# are, and (for a constant schedule) how many epochs to run in all.
_RELOCATABLE = ("data_dir", "out")

# How often each compiled function was traced (read by the tests: no retracing).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class ConfigError(ValueError):
    """An invalid [`TrainConfig`][bioflax_eqx.TrainConfig] field; `field` names it."""

    field: str
    reason: str

    def __init__(self, field: str, reason: str):
        super().__init__(f"`{field}` {reason}")
        self.field = field
        self.reason = reason


class DivergedError(FloatingPointError):
    """The loss or the parameters became NaN or infinite; training stopped and the
    last good checkpoint was kept."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(field: str, value: object, least: int) -> None:
    if not _is_int(value) or value < least:  # pyright: ignore[reportOperatorIssue]
        raise ConfigError(field, f"must be an integer >= {least}, got {value!r}.")


def _check_choice(field: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(field, f"must be one of {', '.join(choices)}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; invalid values raise a
    [`ConfigError`][bioflax_eqx.ConfigError] naming the field on construction,
    before any work.

    The defaults train a 784-256-256-10 ReLU MLP on MNIST with Adam (learning rate
    1e-3, batch 64), which passes 90% test accuracy after one epoch with every rule.

    **Fields:**

    - `rule`: one of [`bioflax_eqx.RULES`][]: `bp fa kp dfa usf brsf frsf`.
    - `dataset`: `mnist`, `fashion_mnist` (IDX files, see
        [`bioflax_eqx.load_dataset`][]), `teacher_student` (regression on a random
        tanh teacher, 32 inputs, 4 outputs, two hidden layers of 64) or `sine`
        (regression, `y = sin(x)`).
    - `data_dir`: the folder holding the IDX files; `None` uses `$BIOFLAX_EQX_DATA`
        or the cache (downloading there once).
    - `limit`: read only the first `limit` training and test examples of an IDX data
        set (for quick checks).
    - `val_size`: training examples held out for validation (chosen by the seed).
    - `n_train`, `n_test`: examples of the synthetic tasks (`val_size` more are drawn
        for validation).
    - `width`, `depth`: hidden layer size and number of hidden layers.
    - `activation`: `relu`, `tanh`, `gelu`, `silu` or `sigmoid`.
    - `optimizer`: `sgd`, `momentum` (SGD with momentum 0.9), `adam` or `adamw`.
    - `lr`: peak learning rate, > 0.
    - `schedule`: `constant`, or `cosine` decay to 0 over the run.
    - `warmup_epochs`: linear warm-up from 0 over this many epochs first.
    - `weight_decay`: in `[0, 1)`, on weight matrices and Kolen-Pollack's feedback
        ([`bioflax_eqx.decay_mask`][]), never on biases or fixed feedback. Added to
        the gradient before the optimiser (L2) for `sgd`, `momentum` and `adam`;
        decoupled for `adamw`.
    - `batch_size`: examples per step; the last incomplete batch of each epoch is
        dropped.
    - `epochs`: epochs to train, >= 1.
    - `seed`: the seed every random choice derives from.
    - `feedback_scale`: scale of the random feedback matrices (see each layer).
    - `metrics_batch`: examples of the fixed batch (the first of the validation
        split, or of the training split without one) for the alignment metrics.
    - `out`: the output folder; `None` writes nothing.
    """

    rule: str = "fa"
    dataset: str = "mnist"
    data_dir: str | None = None
    limit: int | None = None
    val_size: int = 5000
    n_train: int = 20_000
    n_test: int = 5000
    width: int = 256
    depth: int = 2
    activation: str = "relu"
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_epochs: int = 0
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    seed: int = 0
    feedback_scale: float = 1.0
    metrics_batch: int = 1000
    out: str | None = None

    def __post_init__(self):
        _check_choice("rule", self.rule, RULES)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if self.limit is not None:
            _check_int("limit", self.limit, 1)
            if self.dataset not in _IDX_SIZES:
                raise ConfigError(
                    "limit", "applies to mnist and fashion_mnist only; use n_train."
                )
        for field, least in [
            ("val_size", 0),
            ("n_train", 1),
            ("n_test", 1),
            ("width", 1),
            ("depth", 0),
            ("warmup_epochs", 0),
            ("batch_size", 1),
            ("epochs", 1),
            ("seed", 0),
            ("metrics_batch", 1),
        ]:
            _check_int(field, getattr(self, field), least)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", f"must be a positive number, got {self.lr!r}.")
        if not 0 <= self.weight_decay < 1:
            raise ConfigError(
                "weight_decay", f"must be in [0, 1), got {self.weight_decay!r}."
            )
        if not (math.isfinite(self.feedback_scale) and self.feedback_scale > 0):
            raise ConfigError(
                "feedback_scale",
                f"must be a positive number, got {self.feedback_scale!r}.",
            )
        if self.schedule == "cosine" and self.warmup_epochs >= self.epochs:
            raise ConfigError(
                "warmup_epochs",
                f"must be less than epochs ({self.epochs}) for a cosine schedule, "
                f"got {self.warmup_epochs}.",
            )
        if self.dataset in _IDX_SIZES:
            available = _IDX_SIZES[self.dataset][0]
            if self.limit is not None:
                available = min(available, self.limit)
            if self.val_size >= available:
                raise ConfigError(
                    "val_size",
                    f"must be less than the {available} training examples, got "
                    f"{self.val_size}.",
                )
        n_train = self.split_sizes[0]
        if self.batch_size > n_train:
            raise ConfigError(
                "batch_size",
                f"must be at most the {n_train} training examples, got "
                f"{self.batch_size}.",
            )

    @property
    def split_sizes(self) -> tuple[int, int, int]:
        """Examples in the training, validation and test splits."""
        if self.dataset in _IDX_SIZES:
            n_train, n_test = _IDX_SIZES[self.dataset]
            if self.limit is not None:
                n_train, n_test = min(n_train, self.limit), min(n_test, self.limit)
            return n_train - self.val_size, self.val_size, n_test
        return self.n_train, self.val_size, self.n_test

    @property
    def steps_per_epoch(self) -> int:
        return self.split_sizes[0] // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "TrainConfig":
        """The inverse of `to_dict`; unknown fields raise a `ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        for name in fields:
            if name not in known:
                raise ConfigError(name, "is not a TrainConfig field.")
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What [`bioflax_eqx.train`][] returns.

    **Fields:**

    - `config`: the run's configuration.
    - `model`: the trained model (a [`bioflax_eqx.MLP`][]).
    - `history`: one dict per epoch, the lines of `metrics.jsonl`.
    - `summary`: the contents of `summary.json`.
    """

    config: TrainConfig
    model: MLP
    history: list[dict[str, Any]]
    summary: dict[str, Any]


# ----------------------------------------------------------------------- the pieces


def _io_sizes(config: TrainConfig) -> tuple[int, int]:
    """Model input and output sizes, known without loading the data."""
    if config.dataset in _IDX_SIZES:
        return 784, 10
    if config.dataset == "teacher_student":
        return TEACHER[0], TEACHER[1]
    return 1, 1


def _load_data(config: TrainConfig, key: PRNGKeyArray) -> Dataset:
    n_train, n_val, n_test = config.split_sizes
    if config.dataset in _IDX_SIZES:
        return load_dataset(
            config.dataset,
            config.data_dir,
            val_size=n_val,
            key=key,
            limit=config.limit,
            dtype=jnp.float32,
        )
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


def _build_model(config: TrainConfig, key: PRNGKeyArray) -> MLP:
    """Backprop's MLP converted to the rule, so that every rule of a seed starts from
    the same weights and biases (and FA, KP, DFA and frSF from the same draw of
    feedback, where the shapes agree)."""
    init_key, feedback_key = jax.random.split(key)
    in_size, out_size = _io_sizes(config)
    model = MLP(
        in_size,
        out_size,
        config.width,
        config.depth,
        rule="bp",
        activation=ACTIVATIONS[config.activation],
        dtype=jnp.float32,
        key=init_key,
    )
    if config.rule == "bp":
        return model
    return convert(
        model,
        config.rule,
        key=feedback_key,
        feedback_scale=config.feedback_scale,
        error_features=out_size,
    )


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
            # Before the learning-rate scale, so Kolen-Pollack's W - Bᵀ shrinks by
            # (1 - lr * decay) per step (chained after, it would grow).
            decay = optax.add_decayed_weights(config.weight_decay, mask=decay_mask)
            inner = optax.chain(decay, inner)
    return freeze_feedback(inner)


def _cross_entropy(
    logits: Float[Array, " classes"], label: Int[Array, ""]
) -> Float[Array, ""]:
    return jax.nn.logsumexp(logits) - logits[label]


def _squared_error(
    output: Float[Array, " outputs"], target: Float[Array, " outputs"]
) -> Float[Array, ""]:
    return jnp.mean(jnp.square(output - target))


def _loss_fn(config: TrainConfig) -> Callable[[Array, Array], Array]:
    return _cross_entropy if config.dataset in _IDX_SIZES else _squared_error


def _hits(outputs: Array, labels: Array) -> Float[Array, " batch"]:
    return (jnp.argmax(outputs, axis=-1) == labels).astype(jnp.float32)


def _all_finite(tree: PyTree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def _compile_key(config: TrainConfig) -> TrainConfig:
    """The configuration with the fields that do not change the compiled programs
    reset, so that runs differing only in them share the programs (the compiled
    functions below take it as a static, hashed argument)."""
    epochs = config.epochs if config.schedule == "cosine" else 1
    return dataclasses.replace(config, out=None, data_dir=None, seed=0, epochs=epochs)


def _batch_loss(params, static, x, y, key, loss_fn):
    model = eqx.combine(params, static)
    # brSF draws one feedback matrix per step: the key is shared by the batch.
    outputs = jax.vmap(lambda xi: model(xi, key=key))(x)
    return jnp.mean(jax.vmap(loss_fn)(outputs, y)), outputs


@eqx.filter_jit
def _train_epoch(params, opt_state, x, y, key, static, setup: TrainConfig):
    """One epoch: shuffle, then a `lax.scan` of optimiser steps over the batches."""
    TRACE_COUNTS["epoch"] += 1
    optimizer = _optimizer(setup)
    loss_fn = _loss_fn(setup)
    classification = setup.dataset in _IDX_SIZES

    def step(carry, batch):
        params, opt_state = carry
        x, y, key = batch
        (loss, outputs), grads = jax.value_and_grad(_batch_loss, has_aux=True)(
            params, static, x, y, key, loss_fn
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = eqx.apply_updates(params, updates)
        hits = jnp.mean(_hits(outputs, y)) if classification else jnp.zeros(())
        return (params, opt_state), (loss, hits)

    shuffle_key, step_key = jax.random.split(key)
    xb, yb = epoch_batches(shuffle_key, x, y, setup.batch_size)
    keys = jax.random.split(step_key, xb.shape[0])
    (params, opt_state), (losses, hits) = lax.scan(
        step, (params, opt_state), (xb, yb, keys)
    )
    finite = jnp.all(jnp.isfinite(losses)) & _all_finite(params)
    return params, opt_state, jnp.mean(losses), jnp.mean(hits), finite


@eqx.filter_jit
def _evaluate(params, splits, fixed_x, fixed_y, key, static, setup: TrainConfig):
    """Loss (and accuracy) on each `(x, y)` of `splits`, and the alignment metrics on
    the fixed batch: one compiled call per epoch, outside the training scan."""
    TRACE_COUNTS["evaluate"] += 1
    loss_fn = _loss_fn(setup)
    results = []
    for x, y in splits:
        loss, outputs = _batch_loss(params, static, x, y, key, loss_fn)
        acc = jnp.mean(_hits(outputs, y)) if setup.dataset in _IDX_SIZES else None
        results.append((loss, acc))
    model = eqx.combine(params, static)
    alignment = alignment_metrics(model, fixed_x, fixed_y, loss_fn, key=key)
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
    return any((folder / name).exists() for name in _RUN_FILES)


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
    config: TrainConfig, model: MLP, history: list[dict[str, Any]]
) -> dict[str, Any]:
    final = history[-1]
    trainable, fixed = _n_params(model)
    summary = {
        "status": "completed",
        "rule": config.rule,
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
    model: MLP,
    history: list[dict[str, Any]],
) -> TrainResult:
    summary = _summary(config, model, history)
    if out is not None:
        _write_json(out / SUMMARY_NAME, summary)
        title = f"{config.rule} on {config.dataset}"
        plot_learning_curves(history, out / CURVES_NAME, title)
        plot_alignment(history, out / ALIGNMENT_NAME, title)
    return TrainResult(config, model, history, summary)


def _progress(config: TrainConfig, initial: int, quiet: bool):
    # Imported here: tqdm is an optional dependency (the `train` extra). Plain text
    # bars, also in notebooks (tqdm.auto warns there without ipywidgets).
    from tqdm import tqdm

    return tqdm(
        total=config.epochs,
        initial=initial,
        desc=f"{config.rule} {config.dataset}",
        unit="epoch",
        disable=quiet,
        dynamic_ncols=True,
    )


# ------------------------------------------------------------------------- the runs


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Trains a [`bioflax_eqx.MLP`][] as the configuration says.

    Each epoch is one compiled call (a `lax.scan` over the shuffled minibatches, on
    device); then the validation and test splits are evaluated and the alignment
    metrics ([`bioflax_eqx.alignment_metrics`][]) computed on a fixed batch. With
    `config.out` set, every epoch also writes a checkpoint and `metrics.jsonl`, and
    the end of the run `summary.json` and two plots (all described on the Training
    page of this site).

    **Arguments:**

    - `config`: the run.
    - `resume`: continue from the checkpoint in `config.out`. The configuration must
        match the checkpoint's, except `data_dir`, `out`, and `epochs` (which may
        grow, for a constant schedule). The finished run is bit-identical to one
        that was never interrupted.
    - `overwrite`: replace a run already in `config.out`; without it (or `resume`)
        such a folder is refused.
    - `quiet`: no progress bar.
    - `callback`: called with each epoch's metrics after its checkpoint is written.

    **Returns:**

    A [`TrainResult`][bioflax_eqx.TrainResult].

    **Raises:**

    `FileExistsError` (a run is in the way),
    [`CheckpointError`][bioflax_eqx.CheckpointError] (nothing to resume, a damaged
    checkpoint or another configuration's),
    [`DataNotFoundError`][bioflax_eqx.DataNotFoundError], all before any training;
    [`DivergedError`][bioflax_eqx.DivergedError] when the loss becomes NaN or
    infinite, keeping the last good checkpoint.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}.")
    out = None if config.out is None else pathlib.Path(config.out)
    header, payload = None, b""
    if resume:
        if out is None:
            raise ConfigError("out", "must be set to resume a run.")
        header, payload = read_header(out)
        _check_resumable(config, header, out)
    elif out is not None:
        _prepare_fresh(out, overwrite)
    # optax's Adam mixes a float with its int32 step count: standard promotion, so
    # that training works whatever the caller's setting (the arrays are float32).
    with jax.numpy_dtype_promotion("standard"):
        return _run(config, out, header, payload, quiet, callback)


def _run(
    config: TrainConfig,
    out: pathlib.Path | None,
    header: dict[str, Any] | None,
    payload: bytes,
    quiet: bool,
    callback: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    data_key, model_key, train_key, metrics_key = jax.random.split(
        jax.random.key(config.seed), 4
    )
    model = _build_model(config, model_key)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = _optimizer(config)
    opt_state = optimizer.init(params)
    rng = train_key
    history: list[dict[str, Any]] = []
    elapsed = 0.0
    if header is not None and out is not None:
        like = (params, opt_state, jax.random.key_data(rng))
        params, opt_state, rng_data = load_state(out, payload, like)
        rng = jax.random.wrap_key_data(rng_data)
        history = list(header["history"])
        elapsed = float(header["elapsed_s"])
        _write_history(out, history)
    start = len(history)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / CONFIG_NAME, config.to_dict())
    if start == config.epochs:  # resuming a finished run
        return _finish(config, out, eqx.combine(params, static), history)

    data = _load_data(config, data_key)
    if (data.n_features, data.n_outputs) != _io_sizes(config):
        raise RuntimeError(f"{config.dataset} does not have the expected shapes.")
    classification = data.task == "classification"
    setup = _compile_key(config)
    # A fixed batch for the metrics, so that epochs are comparable.
    source = data.val if data.val.x.shape[0] > 0 else data.train
    fixed_x = source.x[: config.metrics_batch]
    fixed_y = source.y[: config.metrics_batch]
    splits = {"val": data.val, "test": data.test}
    splits = {name: s for name, s in splits.items() if s.x.shape[0] > 0}
    schedule = _schedule(config)

    with _progress(config, start, quiet) as bar:
        for epoch in range(start + 1, config.epochs + 1):
            t0 = time.perf_counter()
            rng, epoch_key = jax.random.split(rng)
            new_params, new_opt_state, loss, acc, finite = _train_epoch(
                params, opt_state, data.train.x, data.train.y, epoch_key, static, setup
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
            params, opt_state = new_params, new_opt_state
            evaluated, alignment = _evaluate(
                params,
                [tuple(s) for s in splits.values()],
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
                "train_acc": _json_float(acc) if classification else None,
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
            if out is not None:
                checkpoint_header = {
                    "config": config.to_dict(),
                    "epoch": epoch,
                    "elapsed_s": elapsed,
                    "history": history,
                }
                state = (params, opt_state, jax.random.key_data(rng))
                save_checkpoint(out, checkpoint_header, state)
                _write_history(out, history)
            bar.update(1)
            bar.set_postfix(_postfix(record), refresh=True)
            if callback is not None:
                callback(record)
    return _finish(config, out, eqx.combine(params, static), history)


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


def load_run(folder: str | pathlib.Path) -> TrainResult:
    """Loads the last checkpoint of a run written by [`bioflax_eqx.train`][].

    **Arguments:**

    - `folder`: the run's output folder.

    **Returns:**

    A [`TrainResult`][bioflax_eqx.TrainResult] with the model as of the last
    completed epoch and the metrics up to it.
    """
    folder = pathlib.Path(folder)
    header, payload = read_header(folder)
    config = TrainConfig.from_dict(header["config"])
    with jax.numpy_dtype_promotion("standard"):
        _, model_key, train_key, _ = jax.random.split(jax.random.key(config.seed), 4)
        model = _build_model(config, model_key)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        opt_state = _optimizer(config).init(params)
        like = (params, opt_state, jax.random.key_data(train_key))
        params, _, _ = load_state(folder, payload, like)
        model = eqx.combine(params, static)
    history = list(header["history"])
    return TrainResult(config, model, history, _summary(config, model, history))


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
        _check_choice("rules", rule, RULES)
    if len(set(rules)) != len(rules):
        raise ConfigError("rules", f"must not repeat a rule, got {', '.join(rules)}.")
    out = None if config.out is None else pathlib.Path(config.out)
    configs = {
        rule: dataclasses.replace(
            config, rule=rule, out=None if out is None else str(out / rule)
        )
        for rule in rules
    }
    # Every refusal before any training.
    resumes = {}
    for rule, cfg in configs.items():
        folder = None if cfg.out is None else pathlib.Path(cfg.out)
        resumes[rule] = (
            resume and folder is not None and (folder / CHECKPOINT_NAME).is_file()
        )
        if folder is not None and not resumes[rule] and not overwrite:
            _prepare_fresh(folder, overwrite=False)
    if out is not None and not (resume or overwrite):
        if (out / COMPARISON_NAME).exists():
            raise FileExistsError(
                f"{out} already holds a comparison; pass --resume or --overwrite."
            )
    results = {
        rule: train(cfg, resume=resumes[rule], overwrite=overwrite, quiet=quiet)
        for rule, cfg in configs.items()
    }
    if out is not None:
        _write_json(out / COMPARISON_NAME, comparison_rows(results))
        histories = {rule: r.history for rule, r in results.items()}
        title = f"{config.dataset}, seed {config.seed}"
        plot_comparison(histories, out / COMPARISON_PLOT_NAME, title)
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
