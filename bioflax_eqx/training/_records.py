"""A run's folder: its files (configuration, metrics, summary, plots), the checks
before a fresh run or a resume, and the summary of a finished run."""

import collections
import dataclasses
import json
import math
import pathlib
import statistics
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, PyTree

from .._optim import feedback_labels
from ._checkpoint import CHECKPOINT_NAME, CheckpointError, atomic_write
from ._config import TrainConfig
from ._extras import plots_available
from ._optimizer import schedule
from ._plots import plot_alignment, plot_learning_curves


CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CURVES_NAME = "learning_curves.png"
ALIGNMENT_NAME = "alignment.png"
_RUN_FILES = (CONFIG_NAME, CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME)
_ALL_RUN_FILES = (*_RUN_FILES, CURVES_NAME, ALIGNMENT_NAME)

# Fields that may differ between a checkpoint and the run resuming it: where things
# are and run, and (for a constant schedule) how many epochs to run in all.
_RELOCATABLE = ("data_dir", "out", "devices")


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
    - `characters`: for a text data set, the vocabulary's characters (id `i + 1`
        is `characters[i]`, id 0 the unknown symbol; see
        [`bioflax_eqx.TextCorpus`][]), else `None`.
    """

    config: TrainConfig
    model: Any
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    state: Any = None
    characters: str | None = None


def json_float(value: Any) -> float | None:
    """A JSON-ready float; NaN and infinities (e.g. the angle to a zero gradient)
    become null."""
    value = float(value)
    return value if math.isfinite(value) else None


def write_json(path: pathlib.Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def write_history(out: pathlib.Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole (atomically) each epoch, so it always matches the checkpoint.
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in history)
    atomic_write(out / METRICS_NAME, lines.encode())


def epoch_record(
    config: TrainConfig,
    epoch: int,
    loss: Array,
    acc: Array,
    curve: Array,
    evaluated: dict[str, tuple[Array, Array | None]],
) -> dict[str, Any]:
    """An epoch's line of `metrics.jsonl`, without the alignment and the times."""
    lr = schedule(config)(epoch * config.steps_per_epoch)
    record: dict[str, Any] = {
        "epoch": epoch,
        "lr": json_float(lr),
        "train_loss": json_float(loss),
        "train_acc": json_float(acc) if config.classification else None,
        "train_loss_curve": [json_float(v) for v in curve],
    }
    for name, (split_loss, split_acc) in evaluated.items():
        record[f"{name}_loss"] = json_float(split_loss)
        record[f"{name}_acc"] = None if split_acc is None else json_float(split_acc)
    return record


def postfix(record: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows of an epoch's record."""
    shown = {"loss": "train_loss", "val": "val_acc", "test": "test_acc"}
    if "test_bpc" in record:
        shown = {"loss": "train_loss", "val bpc": "val_bpc", "test bpc": "test_bpc"}
    elif record.get("test_acc") is None:
        shown = {"loss": "train_loss", "val": "val_loss", "test": "test_loss"}
    shown["∠grad"] = "grad_angle/global"
    return {
        label: f"{record[key]:.4g}"
        for label, key in shown.items()
        if record.get(key) is not None
    }


def _has_run(folder: pathlib.Path) -> bool:
    # config.json alone is a run stopped before its first checkpoint: nothing to
    # resume, so a fresh run may replace it.
    return any((folder / name).exists() for name in _RUN_FILES if name != CONFIG_NAME)


def prepare_fresh(out: pathlib.Path, overwrite: bool) -> None:
    """Refuses a folder that holds a run, or with `overwrite` empties it."""
    if _has_run(out):
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a run; pass --resume (resume=True) to continue "
                "it or --overwrite (overwrite=True) to replace it."
            )
        for name in _ALL_RUN_FILES:
            (out / name).unlink(missing_ok=True)


def check_resumable(
    config: TrainConfig, header: dict[str, Any], out: pathlib.Path
) -> None:
    """Refuses to resume the checkpoint `header` (in `out`) with `config`, unless
    they differ only where a run may change on resume."""
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


def summary(
    config: TrainConfig,
    model: Any,
    history: list[dict[str, Any]],
    characters: str | None = None,
) -> dict[str, Any]:
    """The contents of `summary.json` (with a text data set's vocabulary, to
    decode what the model writes)."""
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
    if characters is not None:
        summary["characters"] = characters
    val = [r for r in history if r.get("val_acc") is not None]
    if val:
        best = max(val, key=lambda r: r["val_acc"])
        summary["best_epoch"], summary["best_val_acc"] = best["epoch"], best["val_acc"]
    return summary


def finish(
    config: TrainConfig,
    out: pathlib.Path | None,
    model: Any,
    state: Any,
    history: list[dict[str, Any]],
    characters: str | None = None,
) -> TrainResult:
    """The run's result; in `out` (if any) its summary and plots."""
    result = TrainResult(
        config,
        model,
        history,
        summary(config, model, history, characters),
        state,
        characters,
    )
    if out is not None:
        write_json(out / SUMMARY_NAME, result.summary)
        if plots_available():
            title = f"{config.rule} {config.model} on {config.dataset}"
            plot_learning_curves(history, out / CURVES_NAME, title)
            plot_alignment(history, out / ALIGNMENT_NAME, title)
    return result
