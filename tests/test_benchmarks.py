"""The benchmark scripts run end to end at tiny sizes, so that they cannot rot. No
timing is asserted: the speed targets are checked in the benchmark's own report."""

import dataclasses
import importlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scripts():
    """The benchmark modules, imported from the `benchmarks` package (the tests run
    from the repository root, as `python -m benchmarks.run_all` does)."""
    names = (
        "_timing",
        "_torch",
        "mlp",
        "conv_ops",
        "conv",
        "cifar",
        "cli",
        "devices",
        "run_all",
        "transformer",
    )
    return {name: importlib.import_module(f"benchmarks.{name}") for name in names}


def test_smoke_run_writes_a_report(scripts, tmp_path, mnist_dir):
    out = tmp_path / "results.md"
    scripts["run_all"].main(
        ["--smoke", "--no-torch", "--out", str(out), "--data-dir", str(mnist_dir)]
    )
    text = out.read_text()
    assert "smoke run" in text
    for section in (
        "## MLPs",
        "### MLP 784-16-10",
        "### Whole MNIST epochs, MLP 784-16-10",
        "## LeNet-5",
        "## VGG and ResNet-20 (CIFAR-shaped)",
        "### VGG",
        "### ResNet-20",
        "## `bioflax-eqx train`, start to exit",
        "## Many devices",
    ):
        assert section in text
    # The targets' verdicts go beside the report, not into it.
    assert "## Targets" not in text
    targets = (tmp_path / "targets.md").read_text()
    assert "| kp epoch ≤ 1.1× BP, MLP 784-16-10 |" in targets
    assert "| dfa epoch ≤ 0.9× BP, LeNet |" in targets
    assert "| fa ResNet-20 epoch ≤ 1.05× BP |" in targets
    mlp, lenet = text.split("## LeNet-5")
    lenet, devices = lenet.split("## Many devices")
    lenet, command = lenet.split("## `bioflax-eqx train`")
    # The command ran as a process of its own and recorded its epoch's times.
    assert "| fa | " in command and "PyTorch was not run" in command
    lenet, cifar = lenet.split("## VGG and ResNet-20")
    # The smoke run: 2 simulated devices, in a process of their own.
    assert "functional scaling only" in devices
    assert "| fa | " in devices and "(1.00×) |" in devices
    for rule in ("bp", "kp", "dfa"):
        assert f"| {rule} | " in mlp
    for rule in ("bp", "fa", "dfa"):
        assert f"| {rule} | " in lenet
    # Every ratio is relative to backprop, measured in the same run.
    assert "| bp | 1.00× | 1.00× |" in mlp
    assert "| bp | 1.00× | 1.00× | 1.00× |" in lenet
    vgg, resnet, resnet_ops = cifar.split("### ")[1:]
    for net in (vgg, resnet):  # their epochs
        assert "| bp | 1.00× |" in net and "| fa | " in net
    # Where ResNet-20's time goes: each stage's convolution, op by op, both paths.
    assert resnet_ops.startswith("ResNet-20's convolutions, op by op")
    assert "| conv 64→64, 3×3, 8×8 | weight gradient | " in resnet_ops


def test_smoke_never_overwrites_the_results(scripts):
    with pytest.raises(SystemExit):
        scripts["run_all"].main(["--smoke"])


def test_epochs_run_through_the_library(scripts, monkeypatch, mnist_dir):
    """The benchmark's epochs are `bfx.train_epoch`'s, not a copy of it."""
    import jax
    import jax.numpy as jnp

    import bioflax_eqx as bfx

    real = bfx.train_epoch
    batch_sizes = []

    class Spy:
        def lower(self, *args, **kwargs):
            batch_sizes.append(kwargs["batch_size"])
            return real.lower(*args, **kwargs)  # pyright: ignore[reportFunctionMemberAccess]

    monkeypatch.setattr(bfx, "train_epoch", Spy())
    timing = scripts["_timing"]
    x, y = timing.mnist(str(mnist_dir), 64)
    model = bfx.MLP(784, 10, 8, 1, rule="fa", dtype=jnp.float32, key=jax.random.key(0))
    case = timing.build_case(model, x, y, 16)
    _, _, losses, _ = case.epoch()
    assert batch_sizes == [16]
    assert losses.shape == (4,)
    assert bool(jnp.all(jnp.isfinite(losses)))


def test_flop_count(scripts):
    mlp = scripts["mlp"]
    sizes, batch = [784, 1024, 1024, 10], 128
    layers = 784 * 1024 + 1024 * 1024 + 1024 * 10
    # Forward and weight gradient for every layer; no input cotangent for the data.
    chain = 1024 * 1024 + 1024 * 10
    assert mlp.matmul_flops("bp", sizes, batch) == 2 * batch * (2 * layers + chain)
    assert mlp.matmul_flops("fa", sizes, batch) == 2 * batch * (2 * layers + chain)
    # DFA's hidden layers read the 10 outputs' error instead of the next layer's.
    direct = 1024 * 10 + 1024 * 10
    assert mlp.matmul_flops("dfa", sizes, batch) == 2 * batch * (2 * layers + direct)


def test_run_all_runs_as_a_module():
    """`python -m benchmarks.run_all` from the repository root finds its package
    (no `sys.path` edits); the smoke run above starts `benchmarks.devices` so."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "--smoke" in done.stdout


def test_transformer_smoke_run(scripts, tmp_path):
    out = tmp_path / "transformer.md"
    scripts["transformer"].main(["--smoke", "--out", str(out)])
    text = out.read_text()
    assert "## Transformer (smoke run)" in text
    assert "| bp | " in text and "| 1.00× |" in text
    for rule in ("fa", "dfa-macro"):
        assert f"| {rule} | " in text
    assert "| dfa-macro step ≤ 0.90× BP, Transformer" in text
    assert "DFA's arithmetic" in text and "GFLOP / step (XLA)" in text


def test_dfa_saves_arithmetic_only_where_the_norms_do_not_train(scripts):
    """What the Transformer report says of DFA's cost, on a small model: cutting
    the chain between sub-layers saves the first projections' input cotangents only
    when no trained norm needs them."""
    bench = scripts["transformer"]
    # Width 128, so that the projections outweigh the points' `e Bᵀ` (85 × 128).
    setup = dataclasses.replace(bench.SMOKE, width=128, depth=2, heads=4)
    x, t, vocab = bench.windows(setup, None)
    counts = {}
    for fixed in (False, True):
        for rule in ("bp", "dfa-micro"):
            model = bench.model_for(rule, setup, vocab)
            model = bench._fixed_norms(model) if fixed else model
            counts[fixed, rule] = bench.compiled_step(model, x, t)[1]
    assert counts[False, "dfa-micro"] >= counts[False, "bp"]
    assert counts[True, "dfa-micro"] < 0.97 * counts[True, "bp"]


def test_torch_side_of_the_command_line(mnist_dir):
    """`_torch_cli.py`, the PyTorch process `cli.py` times, runs and reports."""
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks._torch_cli", "--rule", "fa"]
        + ["--data-dir", str(mnist_dir), "--limit", "256", "--val-size", "64"]
        + ["--batch-size", "32"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["n_train"] == 192
    assert record["train_time_s"] > 0 and 0 <= record["test_acc"] <= 1


def test_paired_ratio_cancels_load_between_rounds(scripts):
    """A ratio is the median of the per-round ratios: when the machine's load
    doubles every time between rounds, `a` taking 1.1× `b` in each round gives
    1.1× exactly, where the ratio of the two medians would not."""
    timing = scripts["_timing"]
    b = [1.0, 2.0, 4.0, 8.0, 16.0]
    a = [1.1 * t for t in b]
    a[1], a[3] = 2 * 1.2, 8 * 1.0  # rounds vary: ratios 1.1, 1.2, 1.1, 1.0, 1.1
    order = [4, 0, 2, 1, 3]  # the samples' round order must not matter
    a, b = [a[i] for i in order], [b[i] for i in order]
    stats = timing.Timings({"a": a, "b": b})
    assert stats.paired("a", "b") == pytest.approx(1.1)
    assert stats.paired("b", "a") == pytest.approx(1 / 1.1)


def test_mlp_target_line_states_the_step_the_target_needs(scripts):
    mlp = scripts["mlp"]
    # 2 GFLOP at 200 GFLOP/s: 10 ms of matmuls; 56 MB at 28 GB/s: 2 ms of Adam;
    # PyTorch 16 ms a step, so 2.0× needs 8 ms: the 12 ms floor is above it.
    line = mlp.target_line(2 * 10**9, 200e9, 56 * 10**6, 28e9, 9e-3, 16e-3)
    assert "backprop's step takes 9.00 ms and PyTorch's 16.00 ms" in line
    assert "would need a step of 8.00 ms" in line
    assert "matmuls alone take 10.00 ms" in line
    assert "Adam's 56 MB of traffic 2.00 ms" in line
    assert "a floor of about 12.00 ms, above the step the target needs" in line
    # PyTorch at 30 ms: 15 ms needed, the floor is below it.
    line = mlp.target_line(2 * 10**9, 200e9, 56 * 10**6, 28e9, 9e-3, 30e-3)
    assert "a floor of about 12.00 ms, below the step the target needs" in line


def test_copy_bandwidth_pass_moves_its_array_in_place(scripts):
    timing = scripts["_timing"]
    call, moved = timing.stream(1024)
    assert moved == 2 * 1024 * 4  # read once and written once, float32
    first = np.asarray(call())
    second = np.asarray(call())  # the donated output carried to the next call
    assert first.shape == (1024,) and np.abs(first).min() > 0
    np.testing.assert_array_equal(second, -first)
