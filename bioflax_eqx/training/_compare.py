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
