"""The `bioflax-eqx` command line, end to end on a small slice of MNIST."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import pytest

import bioflax_eqx as bfx
from bioflax_eqx.training import _checkpoint, _compiled
from bioflax_eqx.training._cli import compile_cache_dir, main

from .helpers import SMALL


def _flags(**options) -> list[str]:
    flags = []
    for name, value in options.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _args(out, mnist_dir, *extra, epochs=2, rule="fa") -> list[str]:
    # The contract's spelling, plus the small configuration of `helpers.SMALL`
    # (whose compiled programs these runs then share).
    return [
        "train",
        *["--rule", rule, "--dataset", "mnist", "--data-dir", str(mnist_dir)],
        *["--epochs", str(epochs), "--lr", "1e-3", "--out", str(out), "--quiet"],
        *_flags(**{k: v for k, v in SMALL.items() if k != "dataset"}),
        *extra,
    ]


def _metrics(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if not k.endswith("_time_s")}
        for line in lines
    ]


def test_train_then_resume_to_more_epochs_is_bit_identical(tmp_path, mnist_dir):
    assert main(_args(tmp_path / "whole", mnist_dir, epochs=3)) == 0
    assert main(_args(tmp_path / "parts", mnist_dir, epochs=2)) == 0
    # --resume alone reads the rest of the configuration from the folder.
    resume = ["train", "--out", str(tmp_path / "parts"), "--epochs", "3", "--resume"]
    assert main([*resume, "--quiet"]) == 0
    _, whole = _checkpoint.read_header(tmp_path / "whole")
    header, parts = _checkpoint.read_header(tmp_path / "parts")
    assert whole == parts and header["epoch"] == 3
    assert _metrics(tmp_path / "whole") == _metrics(tmp_path / "parts")
    for name in ("summary.json", "learning_curves.png", "alignment.png"):
        assert (tmp_path / "parts" / name).is_file()
    config = json.loads((tmp_path / "parts" / "config.json").read_text())
    assert config["epochs"] == 3 and config["rule"] == "fa"


def test_refusals_and_damaged_checkpoints(tmp_path, mnist_dir, capsys):
    out = tmp_path / "run"
    assert main(_args(out, mnist_dir, epochs=1)) == 0
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    assert main(_args(out, mnist_dir, epochs=1)) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(_args(out, mnist_dir, "--resume", "--width", "8", epochs=2)) == 1
    assert "different configuration (width=16 there, 8 here)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written

    missing = ["train", "--out", str(tmp_path / "nothing"), "--resume", "--quiet"]
    assert main(missing) == 1
    assert "does not exist" in capsys.readouterr().err
    (out / "checkpoint.eqx").write_bytes(written["checkpoint.eqx"][:1000])
    assert main(["train", "--out", str(out), "--epochs", "2", "--resume"]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err

    assert main(_args(out, mnist_dir, "--overwrite", epochs=1)) == 0
    assert (out / "checkpoint.eqx").read_bytes() != written["checkpoint.eqx"][:1000]


def test_a_run_that_failed_before_any_checkpoint_does_not_block_a_fresh_one(
    tmp_path, mnist_dir, capsys
):
    out, missing = tmp_path / "run", tmp_path / "no-data-here"
    assert main(_args(out, missing, epochs=1)) == 1
    assert "MNIST files missing" in capsys.readouterr().err
    # Nothing was written, and the folder the loader made to download into is gone.
    assert not out.exists() and not missing.exists()
    # A run stopped before its first checkpoint left only config.json: still free.
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(_args(out, mnist_dir, epochs=1)) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    assert len(_metrics(out)) == 1


def test_an_interrupt_says_what_it_kept(tmp_path, mnist_dir, capsys, monkeypatch):
    evaluate = _compiled.evaluate
    calls = []

    def interrupted_in_epoch(epoch):
        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) == epoch:
                raise KeyboardInterrupt
            return evaluate(*args, **kwargs)

        return fake

    out = tmp_path / "run"
    monkeypatch.setattr(_compiled, "evaluate", interrupted_in_epoch(1))
    assert main(_args(out, mnist_dir, epochs=2)) == 130
    err = capsys.readouterr().err
    assert "no epoch had finished, so no checkpoint was written" in err
    assert "checkpoint kept" not in err and not (out / "checkpoint.eqx").exists()

    # The same command again starts afresh; stopped in epoch 2, it keeps epoch 1.
    calls.clear()
    monkeypatch.setattr(_compiled, "evaluate", interrupted_in_epoch(2))
    assert main(_args(out, mnist_dir, epochs=2)) == 130
    assert f"checkpoint kept: {out} at epoch 1 (--resume" in capsys.readouterr().err
    monkeypatch.setattr(_compiled, "evaluate", evaluate)
    resume = ["train", "--out", str(out), "--resume"]
    assert main(resume) == 0
    assert f"resuming {out} from epoch 1." in capsys.readouterr().err
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "-1", "must be a positive finite number"),
        ("--lr", "0", "must be a positive finite number"),
        ("--weight-decay", "1", r"must be in \[0, 1\)"),
        ("--weight-decay", "-0.5", r"must be in \[0, 1\)"),
        ("--width", "0", "must be a positive integer"),
        ("--depth", "-1", "must be a non-negative integer"),
        ("--batch-size", "501", "at most the 500 training examples"),
        ("--epochs", "0", "must be a positive integer"),
        ("--rule", "backprop", "invalid choice"),
        ("--dataset", "imagenet", "invalid choice"),
        ("--model", "resnet50", "invalid choice"),
        ("--augment", "maybe", "invalid choice"),
        ("--model", "custom", "trains a model of your own"),
        ("--optimizer", "lion", "invalid choice"),
        ("--lr", "fast", "invalid float value"),
    ],
)
def test_bad_options_fail_before_any_work(
    flag, value, message, tmp_path, mnist_dir, capsys
):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main([*_args(out, mnist_dir), flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    assert re.search(message, err), err
    assert not out.exists()


def test_diverging_run_exits_with_a_message(tmp_path, mnist_dir, capsys):
    # The configuration of test_train's divergence test: its compiled epoch.
    assert main(_args(tmp_path, mnist_dir, "--lr", "1e30")) == 1
    assert "training diverged in epoch 1" in capsys.readouterr().err


def test_compare_prints_one_table(tmp_path, mnist_dir, capsys):
    args = _args(tmp_path, mnist_dir, epochs=1)
    args[0] = "compare"
    del args[1:3]  # compare takes --rules, not --rule
    assert main([*args, "--rules", "fa", "bp"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["rule", "test", "acc"]
    assert [line.split()[0] for line in table[2:4]] == ["fa", "bp"]
    # Under the table, what its angle columns are.
    assert table[4].startswith("Angles in degrees") and "∠(W,B), each" in table[6]
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["rule"] for row in rows] == ["fa", "bp"]
    assert rows[1]["grad_angle"] == 0.0 and rows[1]["weight_angles"] == [None, None]
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "fa" / "summary.json").is_file()
    assert main([*args, "--rules", "fa", "bp"]) == 1  # a comparison is in the way
    assert main([*args, "--rules", "fa", "bp", "--resume"]) == 0


def test_compiled_programs_are_kept_in_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    own = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compile_cache_dir(False) == tmp_path / "bioflax_eqx" / "xla"
        assert compile_cache_dir(True) is None  # --no-compile-cache
        # A folder given to JAX (e.g. $JAX_COMPILATION_CACHE_DIR) is left as it is.
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "own"))
        assert compile_cache_dir(False) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", own)


@pytest.fixture(scope="module")
def train_help() -> subprocess.CompletedProcess:
    """`python -m bioflax_eqx train --help`, run once for the tests that read it."""
    return subprocess.run(
        [sys.executable, "-m", "bioflax_eqx", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_python_dash_m_help(train_help):
    result = train_help
    assert result.returncode == 0, result.stderr
    for flag in ("--rule", "--dataset", "--data-dir", "--epochs", "--lr", "--out"):
        assert flag in result.stdout
    assert "--resume" in result.stdout and "--quiet" in result.stdout


def test_every_config_field_has_an_option(train_help):
    result = train_help
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for field in dataclasses.fields(bfx.TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in help_text, flag
        if field.name not in ("rule", "out"):
            # The option's help is the field's description.
            assert " ".join(field.metadata["help"].split()) in help_text, field.name
    assert "lenet" in help_text and "resnet20" in help_text and "cifar10" in help_text


# Runs the command line where tqdm and matplotlib cannot be imported: what the base
# package (jax, jaxlib, equinox, optax, jaxtyping, beartype, numpy) gives.
_WITHOUT_EXTRAS = """
import sys
sys.modules["tqdm"] = None
sys.modules["matplotlib"] = None
from bioflax_eqx.training._cli import main
status = main(sys.argv[1:])
for name in ("tqdm", "matplotlib"):
    assert sys.modules[name] is None, name
sys.exit(status)
"""


@pytest.mark.parametrize("quiet", [True, False])
def test_the_command_runs_without_tqdm_and_matplotlib(quiet, tmp_path, mnist_dir):
    # The command is LeNet's and quiet; the MLP compiles faster.
    model = "lenet" if quiet else "mlp"
    args = _args(tmp_path / "run", mnist_dir, "--model", model, epochs=1)
    if not quiet:
        args.remove("--quiet")
    if not quiet:
        args.append("--no-compile-cache")
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(cache)},
    )
    assert result.returncode == 0, result.stderr
    # XLA's compiled programs kept for the next run, unless told not to.
    kept = cache / "bioflax_eqx" / "xla"
    assert (kept.is_dir() and any(kept.iterdir())) == quiet
    assert "Traceback" not in result.stderr
    # Said once; the run is complete, without the plots.
    assert result.stderr.count("plots skipped: matplotlib is not installed") == 1
    assert result.stderr.count("tqdm is not installed") == (0 if quiet else 1)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names == {"config.json", "metrics.jsonl", "summary.json", "checkpoint.eqx"}
    if not quiet:
        assert "fa mlp on mnist, epoch 1, test accuracy" in result.stdout


def test_train_a_conv_net_from_the_command_line(tmp_path, mnist_dir):
    args = _args(tmp_path / "run", mnist_dir, "--model", "lenet", epochs=1)
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    # `auto` is recorded as what it became: no augmentation of MNIST by default.
    assert config["model"] == "lenet" and config["augment"] == "none"
    assert main([*args, "--overwrite", "--augment", "shift"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["augment"] == "shift"
