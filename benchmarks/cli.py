"""The trainer's command line, timed whole: `bioflax-eqx train --model lenet --rule
RULE --dataset mnist --epochs 1` as a process of its own against the same work as a
PyTorch script (`_torch_cli.py`) in a process of its own (issue 16's "done when").

    .venv-bench/bin/python -m benchmarks.cli --out /tmp/cli.md

(`python -m benchmarks.run_all` runs it with the other scripts and writes `results.md`.)
Unlike `conv.py`, which times compiled epochs alone, this counts everything a user
waits for: starting Python, importing JAX (or PyTorch), reading MNIST, compiling,
the epoch, evaluation and writing the run's files.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import bioflax_eqx as bfx

from . import _timing as T


ROOT = pathlib.Path(__file__).resolve().parents[1]  # where `-m benchmarks...` runs
TORCH_TARGET = 1.0  # the command at least as fast as PyTorch (issue 16)
# The command's defaults, which PyTorch's side copies.
DEFAULTS = bfx.TrainConfig()


@dataclasses.dataclass(frozen=True)
class Setup:
    rules: tuple[str, ...]
    repeats: int  # rounds, each running every process once
    limit: int | None  # `--limit`: images read of each split
    val_size: int
    batch: int
    metrics_batch: int
    smoke: bool

    def options(self) -> list[str]:
        """The command's options beyond the issue's (none at full size)."""
        if not self.smoke:
            return []
        return [
            *("--limit", str(self.limit), "--val-size", str(self.val_size)),
            *("--batch-size", str(self.batch)),
            *("--metrics-batch", str(self.metrics_batch)),
        ]


FULL = Setup(
    ("bp", "fa"),
    3,
    None,
    DEFAULTS.val_size,
    DEFAULTS.batch_size,
    DEFAULTS.metrics_batch,
    False,
)
SMOKE = Setup(("fa",), 1, 512, 128, 32, 128, True)


def run_jax(setup: Setup, rule: str, data_dir: str, cache: str) -> dict[str, float]:
    """`bioflax-eqx train` (its `main`, through `python -m bioflax_eqx`) with its
    compiled programs kept under `cache` (`$XDG_CACHE_HOME`): the process's
    seconds, and the epoch's training and evaluation seconds from its
    `metrics.jsonl`."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            *(sys.executable, "-m", "bioflax_eqx", "train", "--model", "lenet"),
            *("--rule", rule, "--dataset", "mnist", "--data-dir", data_dir),
            *("--epochs", "1", "--out", out, *setup.options()),
        ]
        seconds = _timed(command, env={**os.environ, "XDG_CACHE_HOME": cache})
        lines = pathlib.Path(out, "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    return {
        "process": seconds,
        "train": record["train_time_s"],
        "eval": record["eval_time_s"],
    }


def run_torch(setup: Setup, rule: str, data_dir: str, cache: str) -> dict[str, float]:
    """`_torch_cli.py` with the same sizes: the process's seconds, and the epoch's
    training and evaluation seconds that it prints."""
    command = [
        *(sys.executable, "-m", "benchmarks._torch_cli", "--rule", rule),
        *("--data-dir", data_dir, "--val-size", str(setup.val_size)),
        *("--batch-size", str(setup.batch)),
        *(("--limit", str(setup.limit)) if setup.limit is not None else ()),
    ]
    del cache  # PyTorch compiles nothing
    out: list[str] = []
    seconds = _timed(command, out)
    record = json.loads(out[0].splitlines()[-1])
    return {
        "process": seconds,
        "train": record["train_time_s"],
        "eval": record["eval_time_s"],
    }


def _timed(
    command: list[str], stdout: list[str] | None = None, env: dict | None = None
) -> float:
    """Seconds from starting `command` (in the repository root) to its exit."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    if stdout is not None:
        stdout.append(done.stdout)
    return seconds


def run(
    setup: Setup, data_dir: str | None, use_torch: bool
) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """Runs both sides `setup.repeats` times, alternating which goes first; returns
    the report's lines and the targets' verdicts."""
    folder = data_dir if data_dir is not None else T.default_data_dir()
    T.mnist(folder, 1)  # downloads into the cache if need be, once, untimed
    folder = str(bfx.data.resolve_data_dir(folder, "mnist"))
    sides = {"jax": run_jax, **({"torch": run_torch} if use_torch else {})}
    samples: dict[tuple[str, str], list[dict[str, float]]] = {
        (side, rule): [] for side in sides for rule in setup.rules
    }
    # The command keeps XLA's compiled programs (`--no-compile-cache` aside): a
    # first run into an empty cache of this benchmark's own, then the timed rounds.
    cache = tempfile.mkdtemp(prefix="bioflax_eqx_cli_")
    cold = {}
    for rule in setup.rules:
        print(f"cli: {rule}, first run (empty compile cache) ...")
        cold[rule] = run_jax(setup, rule, folder, cache)
    for i in range(setup.repeats):
        for rule in setup.rules:
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            for side in order:
                print(f"cli: round {i + 1}/{setup.repeats}, {rule}, {side} ...")
                samples[side, rule].append(sides[side](setup, rule, folder, cache))
    shutil.rmtree(cache, ignore_errors=True)
    median = {
        key: {f: statistics.median(s[f] for s in runs) for f in runs[0]}
        for key, runs in samples.items()
    }

    lines: list[str] = []
    add = lines.append
    verdicts: list[tuple[str, str, bool]] = []
    size = (
        "all of MNIST"
        if setup.limit is None
        else f"the first {setup.limit} images of each split"
    )
    extra = f", with `{' '.join(setup.options())}`" if setup.options() else ""
    add(
        f"`bioflax-eqx train --model lenet --rule RULE --dataset mnist --epochs 1` "
        f"(run as `python -m bioflax_eqx`{extra}) on {size}: {setup.val_size} training "
        f"images held out for validation, one epoch of batches of {setup.batch} "
        "(Adam, lr 1e-3), then validation, test and the alignment metrics; against "
        "`benchmarks/_torch_cli.py`, the same LeNet-5, data and epoch in PyTorch "
        "(`_torch.py`'s layers), evaluating validation and test. Medians of "
        f"{setup.repeats} round(s), each running every process once, the sides in "
        "alternating order, the command's compiled programs kept from a first "
        "run (its own column: the same command with an empty compile cache, as "
        "on a machine's first run).\n"
    )
    add(
        "Columns: *process* is the whole command, from starting it to its exit "
        "(Python and JAX or PyTorch imports, reading and checking MNIST, building "
        "the model, compiling, the epoch, evaluation, writing `--out`'s files: "
        "config, metrics, checkpoint, summary, and plots where matplotlib is "
        "installed). *train* is the epoch as the run records it (`train_time_s` in "
        "`metrics.jsonl`: for a first epoch this includes compiling it; PyTorch: "
        "optimiser set-up and the epoch); *eval* is `eval_time_s` (compiling and "
        "running evaluation and the alignment metrics; PyTorch: validation and "
        "test, no alignment metrics). The ratios are PyTorch's seconds over ours: "
        "above 1 the command is faster.\n"
    )
    add(
        "| rule | `bioflax-eqx train`: first run | process | train / eval | "
        "PyTorch: process | train / eval | PyTorch ÷ ours (process) | "
        "PyTorch ÷ ours (train + eval) |"
    )
    add("| --- " * 8 + "|")
    for rule in setup.rules:
        ours = median["jax", rule]
        theirs = median.get(("torch", rule))
        epoch = ours["train"] + ours["eval"]
        first = cold[rule]
        cells = [
            rule,
            f"{first['process']:.1f} s ({first['train']:.1f} / {first['eval']:.1f} s)",
            f"{ours['process']:.1f} s",
            f"{ours['train']:.1f} / {ours['eval']:.1f} s",
        ]
        if theirs is None:
            cells += ["", "", "", ""]
        else:
            their_epoch = theirs["train"] + theirs["eval"]
            cells += [
                f"{theirs['process']:.1f} s",
                f"{theirs['train']:.1f} / {theirs['eval']:.1f} s",
                T.ratio(theirs["process"], ours["process"]),
                T.ratio(their_epoch, epoch),
            ]
            for what, a, b in (
                ("whole process", theirs["process"], ours["process"]),
                ("the epoch's train + eval", their_epoch, epoch),
            ):
                verdicts.append(
                    (
                        f"{rule} `bioflax-eqx train --model lenet --epochs 1` ≥ "
                        f"{TORCH_TARGET}× PyTorch's ({what})",
                        T.ratio(a, b),
                        a / b >= TORCH_TARGET,
                    )
                )
        add("| " + " | ".join(cells) + " |")
    add("")
    if not use_torch:
        add("PyTorch was not run (`--no-torch`, or not installed).\n")
    return lines, verdicts


def main(argv: Sequence[str] | None = None) -> None:
    T.script_main("The trainer's command line vs PyTorch.", run, SMOKE, FULL, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
