"""Several rules on one task: `compare` and its table."""

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from .._registry import RULES
from ._checkpoint import CHECKPOINT_NAME
from ._config import ConfigError, TrainConfig, check_choice
from ._extras import plots_available
from ._mesh import is_primary
from ._plots import plot_comparison
from ._records import TrainResult, prepare_fresh, write_json
from ._run import train


COMPARISON_NAME = "comparison.json"
COMPARISON_PLOT_NAME = "comparison.png"


def _check_rules(rules: tuple[str, ...]) -> None:
    if not rules:
        raise ConfigError("rules", "must name at least one rule.")
    for rule in rules:
        check_choice("rules", rule, RULES)
    if len(set(rules)) != len(rules):
        raise ConfigError("rules", f"must not repeat a rule, got {', '.join(rules)}.")


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
    _check_rules(rules)
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
            prepare_fresh(writes / rule, overwrite=False)
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
        write_json(writes / COMPARISON_NAME, comparison_rows(results))
        if plots_available():
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


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _angles(values: list[float | None]) -> str:
    if all(v is None for v in values):
        return "-"
    return "/".join(_fmt(v, ".0f") for v in values)


# What the table's angle columns are (in full on the docs' Training page, Metrics).
_ANGLES_NOTE = (
    "Angles in degrees at the last epoch (0 aligned, 90 unrelated): ∠grad, the "
    "rule's\nweight update against backprop's gradient, all layers; ∠δ, each "
    "layer's error\nsignal against backprop's, from the input; ∠(W,B), each layer's "
    "forward weights\nagainst its feedback. See the Metrics section of the docs' "
    "Training page."
)


def format_table(results: dict[str, TrainResult]) -> str:
    """The comparison as a plain-text table."""
    header = [
        "rule",
        "test acc",
        "test loss",
        "∠grad",
        "∠δ per layer",
        "∠(W,B) per layer",
        "s/epoch",
    ]
    rows = [header]
    for row in comparison_rows(results):
        acc = row["test_acc"]
        rows.append(
            [
                row["rule"],
                "-" if acc is None else f"{100 * acc:.2f}%",
                _fmt(row["test_loss"], ".4f"),
                _fmt(row["grad_angle"], ".1f"),
                _angles(row["delta_angles"]),
                _angles(row["weight_angles"]),
                _fmt(row["time_per_epoch_s"], ".2f"),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(_ANGLES_NOTE)
    return "\n".join(lines)


def summary_line(result: TrainResult) -> str:
    """One run's outcome in a line, as `train` prints it."""
    final: dict[str, Any] = result.history[-1]
    config = result.config
    parts = [f"{config.rule} {config.model} on {config.dataset}"]
    parts.append(f"epoch {final['epoch']}")
    if final.get("test_acc") is not None:
        parts.append(f"test accuracy {100 * final['test_acc']:.2f}%")
    parts.append(f"test loss {_fmt(final.get('test_loss'), '.4f')}")
    if final.get("grad_angle/global") is not None:
        parts.append(f"∠grad {final['grad_angle/global']:.1f}°")
    return ", ".join(parts) + f"; written to {result.config.out}"
