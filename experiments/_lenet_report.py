"""The LeNet tables' report: the Markdown file beside biotorch's figures and its two
figures, from the runs `lenet_tables.py` trained (or read back)."""

import dataclasses
import os
import pathlib
import platform
import statistics
import textwrap

from _common import mean_std


# Sanfiz & Akrout (2021), biotorch's `Benchmarks.md`: top-1 test error (%) of LeNet
# (KP and WM are not in their table).
BIOTORCH = {
    "mnist": {
        "bp": 0.91,
        "fa": 1.70,
        "dfa": 1.61,
        "usf": 0.94,
        "brsf": 0.91,
        "frsf": 0.97,
    },
    "fashion_mnist": {
        "bp": 9.20,
        "fa": 13.06,
        "dfa": 12.81,
        "usf": 9.69,
        "brsf": 10.02,
        "frsf": 9.61,
    },
}
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
AUGMENTS = {
    "none": "no augmentation",
    "shift": "random shifts of up to 2 pixels",
    "shift-flip": "random shifts of up to 2 pixels and random horizontal flips",
}
# The validation split's size (the protocol's; the trainer's default).
VAL_SIZE = 5000
HEADER = (
    "| rule | test error (%) | biotorch (%) | ours − biotorch (points) "
    "| validation error (%) | augmentation | learning rate | epochs chosen "
    "| δ angle, conv 1 / conv 2 (°) | s / epoch |\n" + "| --- " * 10 + "|"
)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a finished sweep gives the report.

    - `augments`, `batch_sizes`, `lrs`: what was offered; `batch_size`: the pilot's
      choice (or the only one).
    - `pilot_val`: backprop's best validation accuracy per `(augmentation, batch)`
      (empty without a pilot).
    - `best_val`: each search run's best validation accuracy, by `(rule,
      augmentation, rate)`; `chosen`: each rule's `(augmentation, rate)`.
    - `histories`: per rule, the epoch records of its runs at the chosen setting,
      seed 0 first.
    - `seconds`: per rule, the median training time per epoch of those runs.
    - `summaries`: every run's `summary.json`, by folder (pilot and search too).
    """

    dataset: str
    activation: str
    epochs: int
    seeds: int
    augments: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    lrs: tuple[float, ...]
    batch_size: int
    pilot_val: dict[tuple[str, int], float]
    best_val: dict[tuple[str, str, float], float]
    chosen: dict[str, tuple[str, float]]
    histories: dict[str, list[list[dict]]]
    seconds: dict[str, float]
    summaries: dict[str, dict]


def chosen_epoch(history: list[dict]) -> dict:
    """The epoch with the best validation accuracy (the first of equals)."""
    return max(history, key=lambda row: (row["val_acc"], -row["epoch"]))


def error(row: dict, split: str) -> float:
    return 100 * (1 - row[f"{split}_acc"])


def figures(
    dataset: str, histories: dict[str, list[list[dict]]], folder: pathlib.Path
) -> list[pathlib.Path]:
    """Test error and δ angles over epochs (mean over seeds), one line per rule,
    written to `folder`; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)

    def mean_curve(runs: list[list[dict]], key) -> tuple[list[int], list[float]]:
        rows = range(len(runs[0]))  # one per epoch, the first being epoch 1
        values = [statistics.mean(key(run[i]) for run in runs) for i in rows]
        return [i + 1 for i in rows], values

    paths = []
    layers = [("conv 1", 0), ("conv 2", 1), ("dense 120", 2), ("dense 84", 3)]
    plots = [("test_error", [("test error (%)", None)]), ("delta_angle", layers)]
    for name, panels in plots:
        fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        for i, (title, layer) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for rule, runs in histories.items():
                if layer is None:
                    x, y = mean_curve(runs, lambda row: error(row, "test"))
                elif rule == "bp":
                    continue
                else:
                    x, y = mean_curve(runs, lambda r, k=layer: r[f"delta_angle/{k}"])
                ax.plot(x, y, label=rule, marker=".")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(title if layer is None else f"δ angle (°), {title}")
            if layer is not None:
                ax.set_ylim(0, 95)
            ax.grid(alpha=0.3)
        fig.axes[-1].legend(fontsize="small", ncols=2)
        path = folder / f"{dataset}_lenet_{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _rows(sweep: Sweep) -> tuple[list[str], str]:
    """The table's rows and the verdict against biotorch's figures."""
    published = BIOTORCH[sweep.dataset]
    rows, beaten, narrow = [], [], []
    missed: dict[str, str] = {}  # by rule
    for rule, runs in sweep.histories.items():
        chosen = [chosen_epoch(h) for h in runs]
        test = [error(row, "test") for row in chosen]
        mean = statistics.mean(test)
        theirs = published.get(rule)
        gap = "—" if theirs is None else f"{mean - theirs:+.2f}"
        if theirs is not None and mean < theirs - 0.005:
            beaten.append(f"{rule} by {theirs - mean:.2f}")
            if len(test) > 1 and theirs - mean < statistics.stdev(test):
                narrow.append(rule)
        elif theirs is not None:  # a tie to two decimals is not a win
            missed[rule] = (
                f"{rule} by {mean - theirs:.2f} points"
                if mean > theirs + 0.005
                else f"{rule} (tied: {mean:.3f} against {theirs})"
            )
        delta = (
            "—"
            if rule == "bp"
            else " / ".join(
                mean_std([row[f"delta_angle/{k}"] for row in chosen]) for k in (0, 1)
            )
        )
        augment, lr = sweep.chosen[rule]
        rows.append(
            f"| {rule} | **{mean_std(test)}** | {theirs or '—'} | {gap} "
            f"| {mean_std([error(row, 'val') for row in chosen])} | `{augment}` "
            f"| {lr:g} | {', '.join(str(row['epoch']) for row in chosen)} "
            f"| {delta} | {sweep.seconds[rule]:.1f} |"
        )
    verdict = (
        "**Every biotorch figure is beaten** (mean test error below theirs): "
        + ", ".join(beaten)
        + " points."
        if not missed
        else f"Beaten: {', '.join(beaten) or 'none'} points. **Missed** (mean test "
        f"error not below biotorch's): {', '.join(missed.values())}."
    )
    if missed:
        verdict += " " + _selection_noise(sweep, list(missed))
    if narrow:
        verdict += (
            f" The margin is smaller than our seeds' standard deviation for "
            f"{', '.join(narrow)}: another set of seeds could land on either side."
        )
    # Runs whose best validation epoch is among the last two were still learning:
    # where a longer budget would go.
    late = {
        rule: sum(chosen_epoch(h)["epoch"] >= sweep.epochs - 1 for h in runs)
        for rule, runs in sweep.histories.items()
    }
    still = [f"{r} {n} of {len(sweep.histories[r])}" for r, n in late.items() if n]
    if still:
        verdict += (
            " Runs whose best validation epoch was one of the last two of "
            f"{sweep.epochs} (still improving when the schedule ended): "
            f"{', '.join(still)}."
        )
    return rows, verdict


def _selection_noise(sweep: Sweep, missed: list[str]) -> str:
    """How narrowly the search chose each missed rule's setting, and what choosing
    on every seed would cost: where the budget for a missed figure would go first."""
    margins = []
    for rule in missed:
        ranked = sorted(
            ((v, a, lr) for (r, a, lr), v in sweep.best_val.items() if r == rule),
            reverse=True,
        )
        if len(ranked) > 1:
            (best, *_), (second, augment, lr) = ranked[:2]
            points = 100 * (best - second)
            margins.append(
                f"{rule}'s setting was chosen by {points:.2f} points of validation "
                f"error ({round(points * VAL_SIZE / 100)} of {VAL_SIZE} images) over "
                f"the next best, `{augment}`, lr {lr:g}"
            )
    if not margins or sweep.seeds < 2:
        return "; ".join(margins) + "." if margins else ""
    # The seeds' spread of the reported runs' validation errors, the largest rule's.
    spread = max(
        statistics.stdev(error(chosen_epoch(h), "val") for h in runs)
        for runs in sweep.histories.values()
    )
    extra = len(sweep.best_val) * (sweep.seeds - 1)
    seconds = [s["total_time_s"] for s in sweep.summaries.values()]
    minutes = extra * statistics.mean(seconds) / 60
    cost = f"{minutes:.0f} CPU-minutes"
    if minutes >= 120:
        cost = f"{minutes / 60:.0f} CPU-hours"
    return (
        "; ".join(margins)
        + ". Each setting is judged on one run (seed 0), and a run's validation "
        f"error moves by up to {spread:.2f} points (standard deviation) from seed "
        "to seed here: more budget would go first to choosing on the mean of "
        f"{sweep.seeds} seeds per setting, {extra} more runs, about {cost} at this "
        "sweep's mean run time."
    )


def _pilot_text(sweep: Sweep) -> str:
    """The pilot's table (backprop, seed 0), or nothing if there was no choice."""
    if not sweep.pilot_val:
        return ""
    rows = "\n".join(
        f"| `{a}` | {b} | {100 * (1 - v):.2f} |"
        for (a, b), v in sweep.pilot_val.items()
    )
    return f"""The pilot (backprop, seed 0, lr {max(sweep.lrs):g}; best validation error
over the epochs, %), which chose batch {sweep.batch_size} for every rule:

| augmentation | batch | validation error (%) |
| --- | --- | --- |
{rows}

"""


def _search_text(sweep: Sweep) -> str:
    """The search's table (seed 0, validation), or nothing if there was no choice."""
    grid = [(a, lr) for a in sweep.augments for lr in sweep.lrs]
    if len(grid) == 1:
        return ""
    several = len(sweep.augments) > 1
    names = [f"`{a}`, lr {lr:g}" if several else f"lr {lr:g}" for a, lr in grid]
    rows = []
    for rule, (augment, lr) in sweep.chosen.items():
        cells = [f"{100 * (1 - sweep.best_val[(rule, *k)]):.2f}" for k in grid]
        pick = f"`{augment}`, {lr:g}" if several else f"{lr:g}"
        rows.append(f"| {rule} | {' | '.join(cells)} | {pick} |")
    top = sum(lr == max(sweep.lrs) for _, lr in sweep.chosen.values())
    edge = (
        f"\nThe largest rate won for {top} of {len(sweep.chosen)} rules: the grid's "
        "edge, so a wider search is where more budget would go first.\n"
        if top
        else ""
    )
    return f"""The search (seed 0; best validation error over the epochs, %):

| rule | {" | ".join(names)} | chosen |
| --- | {"--- | " * len(grid)}--- |
{chr(10).join(rows)}
{edge}
"""


def _protocol(sweep: Sweep) -> str:
    def among(values) -> str:
        return ", ".join(str(v) for v in values)

    if len(sweep.batch_sizes) > 1:
        batch = f"batch {sweep.batch_size} (among {among(sweep.batch_sizes)}, chosen "
        batch += "by the pilot below)"
    else:
        batch = f"batch {sweep.batch_size}"
    offered = [f"`{a}` ({AUGMENTS[a]})" for a in sweep.augments]
    lrs = among(f"{lr:g}" for lr in sweep.lrs)
    if len(sweep.augments) > 1:
        choice = (
            f"Each rule's augmentation, among {among(offered)}, and learning rate, "
            f"among {lrs}, are chosen together by its best validation error (seed 0)"
        )
    elif len(sweep.lrs) > 1:
        choice = (
            f"Augmentation {offered[0]}, fixed before any run. Each rule's learning "
            f"rate is chosen among {lrs} by its best validation error (seed 0)"
        )
    else:
        choice = f"Augmentation {offered[0]}; learning rate {lrs} for every rule"
    return textwrap.fill(
        f"**Protocol.** 55 000 training images, {VAL_SIZE} held out for validation "
        f"(drawn by the seed). Adam, cosine decay to 0 over **{sweep.epochs} epochs**, "
        f"{batch}. {choice}; each run reports the test error of *its epoch of best "
        f"validation accuracy*. Mean ± standard deviation over seeds "
        f"0–{sweep.seeds - 1}. The test set chooses nothing.",
        width=88,
    )


def report(
    sweep: Sweep, figure_paths: list[pathlib.Path], results: pathlib.Path, cifar: str
) -> str:
    """The results file (to be written to `results`): the protocol, the table beside
    biotorch's, the verdict, the pilot and the search, the figures (linked relative
    to the file), and `cifar` (extra text) at the end."""
    rows, verdict = _rows(sweep)
    cpu_minutes = sum(s["total_time_s"] for s in sweep.summaries.values()) / 60
    act = sweep.activation
    data_flag = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}[sweep.dataset]
    links = "\n\n".join(
        f"![{p.stem}]({os.path.relpath(p, results.parent)})" for p in figure_paths
    )
    return f"""# LeNet-5 on {TITLES[sweep.dataset]}: every rule, {sweep.seeds} seeds, \
beside biotorch

Produced by `python experiments/lenet_tables.py --dataset {sweep.dataset} --data-dir
../shared/data/{data_flag} --jobs 2` (this file and its figures are rewritten by it;
the defaults are what ran). LeNet-5 as biotorch benchmarks it (`bioflax-eqx train
--model lenet --activation {act}`: conv 5×5 → 6 on the image padded by 2,
{act}, 2×2 max pool, conv 5×5 → 16, {act}, pool, dense 120,
84, 10), every rule converted from the same backprop network per seed.

{_protocol(sweep)}

{HEADER}
{chr(10).join(rows)}

{verdict}

{_pilot_text(sweep)}{_search_text(sweep)}{links}

- biotorch (Sanfiz & Akrout 2021, `Benchmarks.md`) reports one run per rule, at the
  epoch with the best accuracy *on the test set itself*, after a longer budget. KP
  and weight mirror are not in their table.
- *δ angle*: between the rule's error signal and backprop's at a layer's output, on
  1000 validation images, at the chosen epoch (table) and after every epoch
  (figure; mean over seeds). Test error in the figure: mean over seeds.
- Time per epoch: median over runs of training time only, one run per core
  (single-threaded XLA) on a {platform.machine()} CPU with 2 cores shared with other
  work; the {len(sweep.summaries)} runs (search included) took {cpu_minutes:.0f}
  minutes, each run's wall-clock time summed.
{cifar}"""
