"""The run's PNG plots: labels inside the figure, readable axes, legends clear."""

import math
import pathlib

import pytest

import bioflax_eqx as bfx
from bioflax_eqx.training import _plots


pytest.importorskip("matplotlib")


def _history(epochs: int, offset: float = 0.0) -> list[dict]:
    history = []
    for epoch in range(1, epochs + 1):
        record: dict = {"epoch": epoch}
        for split in ("train", "val", "test"):
            record[f"{split}_loss"] = 0.6 / epoch + offset
            record[f"{split}_acc"] = 0.9 + 0.01 * epoch + offset
        for metric in ("grad_angle", "delta_angle", "weight_angle"):
            for layer in ("0", "1", "global"):
                record[f"{metric}/{layer}"] = 40.0 - epoch + offset
        history.append(record)
    return history


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw (and still save)."""
    drawn = []
    save = _plots._save

    def keep(fig, path):
        drawn.append(fig)
        save(fig, path)

    monkeypatch.setattr(_plots, "_save", keep)
    return drawn


def _inside(fig, artist) -> bool:
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1


@pytest.mark.parametrize("epochs", [1, 3])
def test_learning_curves(epochs, figures, tmp_path: pathlib.Path):
    _plots.plot_learning_curves(_history(epochs), tmp_path / "c.png", "fa mlp")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    loss, acc = fig.axes
    fig.canvas.draw()
    # Both y labels are set and drawn inside the figure (the log panel's ticks
    # once pushed its label out), and each panel has its own title.
    for ax in (loss, acc):
        assert ax.get_ylabel() and _inside(fig, ax.yaxis.label)
    assert loss.get_title() != acc.get_title()
    # Whole epochs only, even for a one-epoch run.
    for ax in (loss, acc):
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("epochs", [1, 2])
def test_the_training_loss_is_drawn_through_each_epoch(epochs, figures, tmp_path):
    history = _history(epochs)
    for record in history:  # four stretches of steps per epoch
        record["train_loss_curve"] = [1.0 / (record["epoch"] + i) for i in range(4)]
    _plots.plot_learning_curves(history, tmp_path / "c.png", "fa transformer")
    loss = figures[0].axes[0]
    (train,) = [x for x in loss.get_lines() if x.get_label().startswith("train")]
    x, y = train.get_data()
    # Each stretch at its middle: epoch e's at e - 1 + 1/8, 3/8, 5/8, 7/8.
    expected_x = [e + (2 * i + 1) / 8 for e in range(epochs) for i in range(4)]
    assert list(x) == pytest.approx(expected_x)
    assert list(y) == [v for r in history for v in r["train_loss_curve"]]
    low, high = loss.get_xlim()
    assert low <= 0 and high >= epochs


def test_training_curve_places_each_stretch_at_its_middle():
    # Epoch 1 as runs from before the curve was recorded; epoch 2 with three
    # stretches, one of them not finite (`null` in metrics.jsonl).
    history = [
        {"epoch": 1, "train_loss": 2.0},
        {"epoch": 2, "train_loss": 1.0, "train_loss_curve": [1.5, None, 0.5]},
    ]
    epochs, losses = bfx.training_curve(history)
    assert epochs == pytest.approx([0.5, 1 + 1 / 6, 1.5, 1 + 5 / 6])
    assert losses[:2] == [2.0, 1.5] and math.isnan(losses[2]) and losses[3] == 0.5
    assert bfx.training_curve([]) == ([], [])


def test_one_epoch_alignment_draws_the_global_point(figures, tmp_path):
    _plots.plot_alignment(_history(1), tmp_path / "a.png", "fa mlp")
    (fig,) = figures
    for ax in fig.axes:
        (line,) = [x for x in ax.get_lines() if x.get_label() == "all layers"]
        # A single point shows only as a marker.
        assert line.get_marker() not in ("None", "", " ", None)


def test_comparison_legend_covers_no_panel(figures, tmp_path):
    rules = ["bp", "fa", "kp", "wm", "dfa", "usf", "brsf", "frsf"]
    histories = {rule: _history(3, 0.001 * i) for i, rule in enumerate(rules)}
    _plots.plot_comparison(histories, tmp_path / "cmp.png", "mnist, seed 0")
    (fig,) = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == rules
    box = legend.get_window_extent(renderer)
    assert _inside(fig, legend)
    for ax in fig.axes:
        assert ax.get_legend() is None
        assert not box.overlaps(ax.get_window_extent(renderer))
