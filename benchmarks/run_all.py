"""Runs every benchmark in one process (but for `devices.py`'s device counts, one
process each) and writes `benchmarks/results.md` (and the issues' targets, met or
not, to `benchmarks/targets.md`).

From the repository root, with the library and PyTorch in one environment:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -e . torch==2.13.0
    .venv-bench/bin/python -m benchmarks.run_all

About 45 minutes on 2 cores. The scripts (`mlp.py`: MLPs; `conv.py`: LeNet-5, with
`conv_ops.py`'s table of each convolution's and pool's ops on both paths;
`cifar.py`: VGG and ResNet-20 on random CIFAR-shaped images; `cli.py`: `bioflax-eqx
train --model lenet --epochs 1` as a whole process against PyTorch's; `devices.py`:
data-parallel epochs on 1, 2 and 4 simulated devices) share `_timing.py`: every
measurement is interleaved with those it is compared with (a fresh random order
each round) and reported as a median; a ratio of two times is the median over
the rounds of their ratio within each round, so that the machine's load, which
moves between rounds, cancels. Epochs run through the library's own
`bfx.train_epoch` (`bfx.train_epoch_with_state` for the CIFAR nets). Without
PyTorch (e.g. `.venv/bin/python -m benchmarks.run_all`, or `--no-torch`) the PyTorch
comparison is left out. `--smoke` runs tiny sizes once, in a minute or two (the test
suite does, so that the scripts cannot rot); it needs `--out`, so that it never
overwrites the results.
"""

import argparse
import datetime
import pathlib
import resource
import sys
from collections.abc import Sequence

from . import _timing as T, _torch, cifar, cli, conv, devices, mlp


DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results.md"
# Written beside the report: each target of the issues and whether it is met.
TARGETS_NAME = "targets.md"


def run(
    smoke: bool, data_dir: str | None, out: pathlib.Path, use_torch: bool
) -> list[tuple[str, str, bool]]:
    """Runs the scripts, writes the report to `out`; returns the targets' verdicts."""
    started = datetime.datetime.now().astimezone()
    load_start = T.load()
    print(f"load average at start: {load_start}")
    info = {**T.machine(), **(_torch.info() if use_torch else {})}
    mlp_lines, mlp_verdicts = mlp.run(
        mlp.SMOKE if smoke else mlp.FULL, data_dir, use_torch
    )
    load_mid = T.load()
    conv_lines, conv_verdicts = conv.run(
        conv.SMOKE if smoke else conv.FULL, data_dir, use_torch
    )
    cifar_lines, cifar_verdicts = cifar.run(
        cifar.SMOKE if smoke else cifar.FULL, data_dir, use_torch
    )
    cli_lines, cli_verdicts = cli.run(
        cli.SMOKE if smoke else cli.FULL, data_dir, use_torch
    )
    devices_lines, _ = devices.run(
        devices.SMOKE if smoke else devices.FULL, data_dir, use_torch
    )
    load_end = T.load()
    verdicts = mlp_verdicts + conv_verdicts + cifar_verdicts + cli_verdicts

    mode = " (smoke run: tiny sizes, not a measurement)" if smoke else ""
    lines = [f"# Benchmarks{mode}\n"]
    add = lines.append
    add(
        "Written by `.venv-bench/bin/python -m benchmarks.run_all` (setup in its "
        "docstring); every figure below comes from one run of it. Times compared "
        "with each other were measured interleaved, in rounds (each round runs "
        "each once, in a fresh random order); a ratio of two times is the median "
        "over the rounds of their ratio within a round. The machine is shared with "
        "other work: the load average shows how much.\n"
    )
    add(
        f"Run: {started:%Y-%m-%d %H:%M %Z}. Load average (1, 5, 15 min): "
        f"{load_start} at start, {load_mid} after the MLPs, {load_end} at the end.\n"
    )
    add("| machine | |\n| --- | --- |")
    for k, v in info.items():
        add(f"| {k} | {v} |")
    add("")
    add("## MLPs\n")
    lines += mlp_lines
    add("## LeNet-5\n")
    lines += conv_lines
    add("## VGG and ResNet-20 (CIFAR-shaped)\n")
    lines += cifar_lines
    add("## `bioflax-eqx train`, start to exit\n")
    lines += cli_lines
    add("## Many devices\n")
    lines += devices_lines
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    add(f"\nProcess peak RSS over the whole run: {rss:.0f} MiB.\n")
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    # The issue tracker's goals are the project's checklist, not part of the report.
    targets = [
        "# Benchmark targets\n",
        f"From the run of {started:%Y-%m-%d %H:%M %Z}.\n",
    ]
    targets += T.verdict_lines(verdicts)
    out.with_name(TARGETS_NAME).write_text("\n".join(targets) + "\n")
    print(text)
    print("\n".join(targets))
    return verdicts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Every benchmark, one report.")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--data-dir", default=None, help="the MNIST IDX folder")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    out = args.out
    if out is None:
        if args.smoke:
            parser.error("--smoke needs --out (it must not overwrite results.md)")
        out = DEFAULT_OUT
    run(args.smoke, args.data_dir, out, _torch.available(args.no_torch))


if __name__ == "__main__":
    main(sys.argv[1:])
