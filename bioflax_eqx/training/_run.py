"""Training runs: one compiled call per epoch, alignment metrics once per epoch,
checkpoints after every epoch, bit-identical resume.

A run is a pure function of its [`TrainConfig`][bioflax_eqx.TrainConfig]: every random
choice (validation split, initial weights, feedback, batch order, augmentation,
brSF's draws) comes from `jax.random.key(config.seed)`, whatever the number of
devices it runs on (data-parallel over a mesh of them, with JAX's sharding).
"""

import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh
from jaxtyping import Array, PRNGKeyArray

from ..data import Dataset, TextCorpus
from . import _compiled
from ._build import check_custom, load_data
from ._checkpoint import CheckpointError, read_header, save_checkpoint
from ._config import ConfigError, TrainConfig, io_shapes
from ._extras import progress
from ._language import evaluate_text, load_corpus, text_evaluation_data, text_record
from ._mesh import is_primary, make_mesh, replicated
from ._records import (
    CONFIG_NAME,
    TrainResult,
    check_resumable,
    epoch_record,
    finish,
    json_float,
    postfix,
    prepare_fresh,
    summary,
    write_history,
    write_json,
)
from ._run_state import RunState, fresh, restore


class DivergedError(FloatingPointError):
    """The loss or the parameters became NaN or infinite; training stopped and the
    last good checkpoint was kept."""


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
    check_custom(config, model)
    mesh = make_mesh(config)
    out = None if config.out is None else pathlib.Path(config.out)
    checkpoint = None
    if resume:
        if out is None:
            raise ConfigError("out", "must be set to resume a run.")
        checkpoint = read_header(out)
        check_resumable(config, checkpoint[0], out)
    elif out is not None and is_primary():
        prepare_fresh(out, overwrite)
    run = _Run(config, out, mesh, quiet, callback)
    # optax's Adam mixes a float with its int32 step count: standard promotion, so
    # that training works whatever the caller's setting (the arrays are float32).
    with jax.numpy_dtype_promotion("standard"):
        return run(checkpoint, model, state)


@dataclasses.dataclass(frozen=True)
class _Run:
    """How a run goes, whatever it starts from: its configuration, its folder,
    its devices, and what it shows and calls back."""

    config: TrainConfig
    out: pathlib.Path | None
    mesh: Mesh | None
    quiet: bool
    callback: Callable[[dict[str, Any]], None] | None

    @property
    def writes(self) -> pathlib.Path | None:
        """The folder this process writes: only process 0 of a multi-host run
        does; every process reads to resume."""
        return self.out if is_primary() else None

    def __call__(
        self,
        checkpoint: tuple[dict[str, Any], bytes] | None,
        model: Any,
        state: Any,
    ) -> TrainResult:
        """Runs from `checkpoint` (its header and arrays' bytes), or from the start
        with the custom `model` and `state` (if any)."""
        config, writes = self.config, self.writes
        data_key, model_key, train_key, metrics_key = jax.random.split(
            jax.random.key(config.seed), 4
        )
        # A corpus first: its vocabulary sizes the model. Read before anything is
        # written, as every data set: a missing one leaves no folder behind.
        corpus = load_corpus(config) if config.text else None
        characters = None if corpus is None else corpus.characters
        training = fresh(config, model_key, train_key, model, state, characters)
        if checkpoint is not None:
            training = self._resume(training, *checkpoint)
        if len(training.history) == config.epochs:  # resuming a finished run
            if writes is not None:
                write_json(writes / CONFIG_NAME, config.to_dict())
            return self._finish(training)
        data = corpus if corpus is not None else load_data(config, data_key)
        if writes is not None:
            writes.mkdir(parents=True, exist_ok=True)
            write_json(writes / CONFIG_NAME, config.to_dict())
        if isinstance(data, Dataset):
            (n_features,), n_outputs = io_shapes(config)
            if (data.n_features, data.n_outputs) != (n_features, n_outputs):
                raise RuntimeError(
                    f"{config.dataset} does not have the expected shapes."
                )
        start = len(training.history)
        with progress(config, start, self.quiet or writes is None) as bar:
            for record in self._epochs(training, data, metrics_key):
                if writes is not None:
                    self._save(writes, training)
                bar.update(1)
                bar.set_postfix(postfix(record), refresh=True)
                if self.callback is not None:
                    self.callback(record)
        return self._finish(training)

    def _finish(self, training: RunState) -> TrainResult:
        return finish(
            self.config,
            self.writes,
            training.model,
            training.state,
            training.history,
            training.characters,
        )

    def _resume(
        self, training: RunState, header: dict[str, Any], payload: bytes
    ) -> RunState:
        assert self.out is not None  # resuming needs `out` (checked by `train`)
        saved = header.get("characters")
        if saved != training.characters:
            raise CheckpointError(
                f"the checkpoint in {self.out} was trained on a corpus of another "
                "vocabulary than the one read now; resume on the same text."
            )
        training = restore(self.config, training, self.out, payload)
        training.history = list(header["history"])
        training.elapsed = float(header["elapsed_s"])
        if self.writes is not None:
            write_history(self.writes, training.history)
            if not self.quiet:
                print(
                    f"bioflax-eqx: resuming {self.out} from epoch "
                    f"{len(training.history)}.",
                    file=sys.stderr,
                )
        return training

    def _save(self, writes: pathlib.Path, training: RunState) -> None:
        header = {
            "config": self.config.to_dict(),
            "epoch": len(training.history),
            "elapsed_s": training.elapsed,
            "history": training.history,
        }
        if training.characters is not None:
            header["characters"] = training.characters
        save_checkpoint(writes, header, training.arrays())
        write_history(writes, training.history)

    def _epochs(
        self,
        training: RunState,
        data: Dataset | TextCorpus,
        metrics_key: PRNGKeyArray,
    ) -> Iterator[dict[str, Any]]:
        """Trains the remaining epochs, updating `training` in place; yields each
        epoch's record once `training` holds the epoch's result."""
        config, mesh = self.config, self.mesh
        setup = _compiled.make_setup(config, training.model, training.state, mesh)
        if isinstance(data, TextCorpus):
            names, splits, fixed, metrics_key = text_evaluation_data(
                config, data, metrics_key, mesh
            )
            train_x, train_y = replicated(data.train, mesh), None
            evaluate = evaluate_text
        else:
            names, splits, fixed, metrics_key = _compiled.evaluation_data(
                config, data, metrics_key, mesh
            )
            train_x, train_y = replicated((data.train.x, data.train.y), mesh)
            evaluate = _compiled.evaluate
        # Data parallel: the model, its state and the optimiser's replicated on
        # every device (whether fresh or from a checkpoint of any device count), and
        # so is the data, of which each device takes its part of every batch.
        t = training
        t.params, t.static, t.opt_state, t.state = replicated(
            (t.params, t.static, t.opt_state, t.state), mesh
        )
        for epoch in range(len(t.history) + 1, config.epochs + 1):
            t0 = time.perf_counter()
            t.rng, epoch_key = jax.random.split(t.rng)
            params, state, opt_state, loss, acc, curve, finite = _compiled.train_epoch(
                t.params,
                t.state,
                t.opt_state,
                train_x,
                train_y,
                replicated(epoch_key, mesh),
                t.static,
                setup,
            )
            finite = bool(finite)  # waits for the epoch
            t1 = time.perf_counter()
            if not finite:
                raise self._diverged(epoch, loss)
            t.params, t.state, t.opt_state = params, state, opt_state
            evaluated, alignment = evaluate(
                t.params, t.state, splits, *fixed, metrics_key, t.static, setup
            )
            record = epoch_record(
                config, epoch, loss, acc, curve, dict(zip(names, evaluated))
            )
            record.update({k: json_float(v) for k, v in alignment.items()})
            if config.text:
                assert config.depth is not None  # resolved on construction
                record.update(text_record(record, config.depth))
            t2 = time.perf_counter()
            t.elapsed += t2 - t0
            record.update(
                train_time_s=t1 - t0, eval_time_s=t2 - t1, wall_time_s=t.elapsed
            )
            t.history.append(record)
            yield record

    def _diverged(self, epoch: int, loss: Array) -> DivergedError:
        kept = (
            f"the last good checkpoint (epoch {epoch - 1}) is kept in {self.out}"
            if self.out is not None and epoch > 1
            else "no checkpoint was written"
        )
        return DivergedError(
            f"training diverged in epoch {epoch}: the loss or the parameters "
            f"became NaN or infinite (mean loss {float(loss)}); {kept}. Try a "
            "smaller learning rate (--lr)."
        )


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
    check_custom(config, model)
    characters = header.get("characters")  # a text data set's vocabulary
    with jax.numpy_dtype_promotion("standard"):
        keys = jax.random.split(jax.random.key(config.seed), 4)
        initial = fresh(config, keys[1], keys[2], model, state, characters)
        trained = restore(config, initial, folder, payload)
    history = list(header["history"])
    result = summary(config, trained.model, history, characters)
    return TrainResult(
        config, trained.model, history, result, trained.state, characters
    )
