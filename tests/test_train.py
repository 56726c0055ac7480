"""`bfx.train` end to end on small MNIST runs: the files a run writes, bit-identical
resume without retracing, refusals before any work, divergence and NaN, no output
folder, the epoch's loss curve.

The MNIST runs of the `test_train*.py` files share one small configuration
(`helpers.SMALL`), and so their compiled programs."""

import collections
import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx
from bioflax_eqx.training import _checkpoint, _compiled

from .helpers import (
    Killed,
    build,
    read_lines,
    small,
    tree_allclose,
    without_times,
)


@pytest.mark.parametrize("steps", [1, 5, 16, 37, 100])
def test_loss_curve_averages_consecutive_stretches_of_steps(steps):
    losses = np.random.default_rng(steps).normal(size=steps).astype(np.float32)
    expected = [part.mean() for part in np.array_split(losses, min(steps, 16))]
    curve = _compiled.loss_curve(jnp.asarray(losses), points=16)
    np.testing.assert_allclose(curve, expected, rtol=1e-6, atol=1e-6)


def test_resume_is_bit_identical_and_nothing_retraces(tmp_path, mnist_dir):
    whole_config = small(tmp_path / "whole", mnist_dir, epochs=3)
    before = collections.Counter(_compiled.TRACE_COUNTS)
    whole = bfx.train(whole_config, quiet=True)
    # Once at most (other tests may have compiled the same programs already), never
    # once per epoch.
    traced = _compiled.TRACE_COUNTS - before
    assert set(traced) <= {"epoch", "evaluate"}
    assert all(count == 1 for count in traced.values())

    def kill_after_epoch_2(record):
        if record["epoch"] == 2:
            raise Killed

    parts_config = small(tmp_path / "parts", mnist_dir, epochs=3)
    with pytest.raises(Killed):
        bfx.train(parts_config, quiet=True, callback=kill_after_epoch_2)
    assert len(read_lines(tmp_path / "parts" / "metrics.jsonl")) == 2
    assert not (tmp_path / "parts" / "summary.json").exists()
    resumed = bfx.train(parts_config, resume=True, quiet=True)
    # Another folder, an interruption and a restored state: no new compilation.
    assert _compiled.TRACE_COUNTS - before == traced

    # Model, optimiser state and RNG: the same bytes.
    whole_header, whole_payload = _checkpoint.read_header(tmp_path / "whole")
    parts_header, parts_payload = _checkpoint.read_header(tmp_path / "parts")
    assert whole_payload == parts_payload
    assert whole_header["epoch"] == parts_header["epoch"] == 3
    for a, b in zip(
        jax.tree_util.tree_leaves(whole.model), jax.tree_util.tree_leaves(resumed.model)
    ):
        assert a.dtype == jnp.float32  # float32 training, even with x64 on
        np.testing.assert_array_equal(a, b)
    assert without_times(whole.history) == without_times(resumed.history)
    assert without_times(read_lines(tmp_path / "whole" / "metrics.jsonl")) == (
        without_times(read_lines(tmp_path / "parts" / "metrics.jsonl"))
    )
    loaded = bfx.load_run(tmp_path / "parts")
    assert eqx.tree_equal(loaded.model, resumed.model)
    # Resuming a finished run only rewrites its summary and plots.
    again = bfx.train(parts_config, resume=True, quiet=True)
    assert without_times(again.history) == without_times(resumed.history)


def test_files_written(tmp_path, mnist_dir):
    result = bfx.train(small(tmp_path, mnist_dir, epochs=2), quiet=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoint.eqx",
        "learning_curves.png",
        "alignment.png",
    }
    for png in ("learning_curves.png", "alignment.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "config.json").read_text()) == result.config.to_dict()
    history = read_lines(tmp_path / "metrics.jsonl")
    assert history == result.history and [r["epoch"] for r in history] == [1, 2]
    expected = {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss"}
    expected |= {"train_loss_curve"}
    expected |= {"test_acc", "lr", "train_time_s", "eval_time_s", "wall_time_s"}
    expected |= {f"grad_angle/{i}" for i in ("0", "1", "global")}
    expected |= {f"grad_norm_ratio/{i}" for i in ("0", "1", "global")}
    expected |= {f"delta_angle/{i}" for i in ("0", "1", "global")}
    expected |= {"weight_angle/0", "weight_angle/1"}
    expected |= {"feedback_norm_ratio/0", "feedback_norm_ratio/1"}
    assert set(history[0]) == expected | {"epoch"}
    assert 0.0 < history[-1]["test_acc"] <= 1.0
    assert history[0]["delta_angle/1"] == 0.0  # the output layer's δ is backprop's
    for record in history:  # the curve's stretches cover the epoch's steps
        curve = record["train_loss_curve"]
        assert 1 <= len(curve) <= _compiled.CURVE_POINTS
        assert min(curve) <= record["train_loss"] <= max(curve)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"] == history[-1] and summary["status"] == "completed"
    assert summary["n_params"] == 784 * 16 + 16 + 16 * 10 + 10
    assert summary["n_fixed_feedback_params"] == 784 * 16 + 16 * 10
    # FA (the default rule) trained its weights but never its feedback.
    initial = build(result.config)
    for before, after in zip(initial.layers, result.model.layers):
        assert isinstance(before, bfx.FA) and isinstance(after, bfx.FA)
        np.testing.assert_array_equal(before.feedback, after.feedback)
        assert not tree_allclose(before.weight, after.weight)


def test_existing_runs_and_bad_checkpoints_are_refused_before_any_work(
    tmp_path, mnist_dir
):
    config = small(tmp_path, mnist_dir, epochs=1)
    bfx.train(config, quiet=True)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def unchanged():
        return {p.name: p.read_bytes() for p in tmp_path.iterdir()} == written

    with pytest.raises(FileExistsError, match="already holds a run"):
        bfx.train(config, quiet=True)
    assert unchanged()
    other = dataclasses.replace(config, width=8, epochs=2)
    with pytest.raises(bfx.CheckpointError, match=r"different configuration \(width"):
        bfx.train(other, resume=True, quiet=True)
    cosine = dataclasses.replace(config, epochs=2, schedule="cosine")
    with pytest.raises(bfx.CheckpointError, match="schedule="):
        bfx.train(cosine, resume=True, quiet=True)
    shorter = dataclasses.replace(config, epochs=2)
    missing = dataclasses.replace(shorter, out=str(tmp_path / "nothing"))
    with pytest.raises(bfx.CheckpointError, match="does not exist"):
        bfx.train(missing, resume=True, quiet=True)
    assert unchanged()

    checkpoint = tmp_path / "checkpoint.eqx"
    checkpoint.write_bytes(written["checkpoint.eqx"][:-100])
    with pytest.raises(bfx.CheckpointError, match="truncated or corrupt"):
        bfx.train(shorter, resume=True, quiet=True)
    with pytest.raises(bfx.CheckpointError, match="truncated or corrupt"):
        bfx.load_run(tmp_path)
    checkpoint.unlink()
    with pytest.raises(bfx.CheckpointError, match="holds no checkpoint"):
        bfx.train(shorter, resume=True, quiet=True)

    # --overwrite replaces the run.
    result = bfx.train(shorter, overwrite=True, quiet=True)
    assert read_lines(tmp_path / "metrics.jsonl") == result.history
    assert len(result.history) == 2


def test_huge_learning_rate_stops_with_a_clear_message(tmp_path, mnist_dir):
    config = small(tmp_path, mnist_dir, lr=1e30, epochs=2)
    with pytest.raises(bfx.DivergedError, match="diverged in epoch 1.*--lr"):
        bfx.train(config, quiet=True)
    assert not (tmp_path / "checkpoint.eqx").exists()


def test_nan_keeps_the_last_good_checkpoint(tmp_path, mnist_dir, monkeypatch):
    real = _compiled.train_epoch
    calls = []

    def nan_in_epoch_2(*args):
        params, state, opt_state, loss, acc, curve, finite = real(*args)
        calls.append(None)
        if len(calls) == 2:
            nan = jnp.float32(jnp.nan)
            return params, state, opt_state, nan, acc, curve, jnp.array(False)
        return params, state, opt_state, loss, acc, curve, finite

    monkeypatch.setattr(_compiled, "train_epoch", nan_in_epoch_2)
    config = small(tmp_path, mnist_dir, epochs=3)
    with pytest.raises(bfx.DivergedError, match=r"epoch 2.*checkpoint \(epoch 1\)"):
        bfx.train(config, quiet=True)
    assert len(read_lines(tmp_path / "metrics.jsonl")) == 1
    assert not (tmp_path / "summary.json").exists()
    assert bfx.load_run(tmp_path).history[-1]["epoch"] == 1


def test_no_output_folder_writes_nothing(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small(tmp_path, mnist_dir, epochs=1, out=None)
    result = bfx.train(config, quiet=True)
    assert list(tmp_path.iterdir()) == []
    assert result.summary["epochs"] == 1
    with pytest.raises(bfx.ConfigError, match="`out`"):
        bfx.train(config, resume=True)
