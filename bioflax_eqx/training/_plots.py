"""PNG plots of a run's metrics (matplotlib's Agg canvas, no pyplot state)."""

import io
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ._checkpoint import atomic_write


_LAYER_KEY = re.compile(r"^(\w+)/(\d+|global)$")


def _figure(
    ncols: int,
    epochs: Sequence[int],
    *,
    width: float = 4.2,
    height: float = 3.2,
    legend: float = 0.0,
):
    """A figure of `ncols` panels against `epochs`, with `legend` inches on the
    right for a legend shared by the panels."""
    # Imported here: matplotlib is an optional dependency (the `train` extra).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    total = width * ncols + legend
    fig = Figure(figsize=(total, height))
    # Fixed margins in inches: a layout engine would cost more than the drawing.
    fig.subplots_adjust(
        left=0.75 / total,
        right=1 - (0.15 + legend) / total,
        bottom=0.55 / height,
        top=1 - 0.35 / height,
        wspace=0.4,
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    first, last = min(epochs), max(epochs)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        if first == last:
            # One epoch: matplotlib's ±5% view would get fractional ticks.
            ax.set_xlim(first - 0.5, first + 0.5)
            ax.set_xticks([first])
    return fig, axes


def _plain_log_ticks(ax) -> None:
    """Log-scale y ticks as plain numbers: `6×10⁻¹` would push the label out."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:.3g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def _save(fig, path: pathlib.Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())


def _values(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    # JSON null (a metric that was NaN or undefined) plots as a gap.
    return [math.nan if r.get(key) is None else r[key] for r in history]


def _series(history: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """The run's keys `metric/0`, `metric/1`, ..., then `metric/global`."""
    keys = {m.group(0) for k in history[0] if (m := _LAYER_KEY.match(k))}
    layers = sorted(
        (k for k in keys if k.startswith(metric + "/") and not k.endswith("global")),
        key=lambda k: int(k.rsplit("/", 1)[1]),
    )
    return layers + [k for k in keys if k == f"{metric}/global"]


def training_curve(
    history: Sequence[Mapping[str, Any]],
) -> tuple[list[float], list[float]]:
    """A run's training loss through its epochs, against a continuous epoch axis.

    An epoch's `train_loss_curve` holds the mean loss over consecutive stretches of
    its steps, `n` in all; stretch `i` of epoch `k` is drawn at its middle,
    `k - 1 + (i + 1/2) / n`. An epoch recorded without a curve (runs from before the
    trainer kept it) gives its mean `train_loss`, at the middle of the epoch.

    ```python
    result = bfx.train(config)
    epochs, losses = bfx.training_curve(result.history)
    ```

    **Arguments:**

    - `history`: a run's epoch records in order, the lines of its `metrics.jsonl`
        (`TrainResult.history`, or [`bioflax_eqx.load_run`][]'s).

    **Returns:**

    `(epochs, losses)`, two lists of floats of one length; a loss that was not
    finite (`null` in the file) is `nan`.
    """
    epochs, losses = [], []
    for record in history:
        curve = record.get("train_loss_curve") or [record["train_loss"]]
        n = len(curve)
        epochs += [record["epoch"] - 1 + (i + 0.5) / n for i in range(n)]
        losses += [math.nan if v is None else float(v) for v in curve]
    return epochs, losses


def plot_learning_curves(
    history: Sequence[dict[str, Any]], path: pathlib.Path, title: str
) -> None:
    """Loss (train, validation, test) and accuracy against the epoch; the training
    loss through each epoch where the run recorded it."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    classification = history[0].get("test_acc") is not None
    fig, axes = _figure(2 if classification else 1, epochs)
    for split in ("train", "val", "test"):
        if split == "train" and history[0].get("train_loss_curve"):
            axes[0].plot(*training_curve(history), "-", label="train (during)")
            axes[0].set_xlim(min(epochs) - 1, max(epochs) + 0.1)
            axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        elif f"{split}_loss" in history[0]:
            axes[0].plot(epochs, _values(history, f"{split}_loss"), "o-", label=split)
    axes[0].set(xlabel="epoch", ylabel="loss (log scale)", yscale="log")
    axes[0].set_title(f"{title}: loss", fontsize="medium")
    _plain_log_ticks(axes[0])
    axes[0].legend()
    if classification:
        for split in ("train", "val", "test"):
            if f"{split}_acc" in history[0]:
                acc = [100 * v for v in _values(history, f"{split}_acc")]
                axes[1].plot(epochs, acc, "o-", label=split)
        axes[1].set(xlabel="epoch", ylabel="accuracy (%)")
        axes[1].set_title(f"{title}: accuracy", fontsize="medium")
        axes[1].legend()
    _save(fig, path)


_ALIGNMENT_PANELS = (
    ("grad_angle", "weight gradient vs BP (°)"),
    ("delta_angle", "δ vs BP's δ (°)"),
    ("weight_angle", "W vs B (°)"),
)


def plot_alignment(
    history: Sequence[dict[str, Any]], path: pathlib.Path, title: str
) -> None:
    """Each alignment angle, one line per layer, against the epoch."""
    epochs = [r["epoch"] for r in history]
    panels = [(m, label) for m, label in _ALIGNMENT_PANELS if _series(history, m)]
    fig, axes = _figure(max(len(panels), 1), epochs)
    for ax, (metric, label) in zip(axes, panels):
        for key in _series(history, metric):
            name = key.split("/")[1]
            # With markers, so that a one-epoch run shows the global point too.
            style = "ks--" if name == "global" else "o-"
            layer = "all layers" if name == "global" else f"layer {name}"
            ax.plot(epochs, _values(history, key), style, label=layer)
        ax.set(xlabel="epoch", ylabel=label, ylim=(0, 95))
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="small")
    _save(fig, path)


def plot_comparison(
    histories: Mapping[str, Sequence[dict[str, Any]]], path: pathlib.Path, title: str
) -> None:
    """Test accuracy (or loss) and the global gradient angle of several rules."""
    all_epochs = [r["epoch"] for h in histories.values() for r in h]
    # The legend beside the panels, where it covers no curve.
    fig, axes = _figure(2, all_epochs, legend=0.8)
    for rule, history in histories.items():
        epochs = [r["epoch"] for r in history]
        if history[0].get("test_acc") is not None:
            axes[0].plot(
                epochs,
                [100 * v for v in _values(history, "test_acc")],
                "o-",
                label=rule,
            )
            axes[0].set(ylabel="test accuracy (%)")
        else:
            axes[0].plot(epochs, _values(history, "test_loss"), "o-", label=rule)
            axes[0].set(ylabel="test loss", yscale="log")
        axes[1].plot(epochs, _values(history, "grad_angle/global"), "o-", label=rule)
    axes[0].set(xlabel="epoch")
    axes[0].set_title(title, fontsize="medium")
    axes[1].set(
        xlabel="epoch", ylabel="weight gradient vs BP (°, all layers)", ylim=(0, 95)
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize="small", title="rule")
    _save(fig, path)
