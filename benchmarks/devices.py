"""Data-parallel epochs: examples per second of `bfx.train_epoch(mesh=...)` (MNIST,
an MLP, each batch split over the devices) on 1, 2 and 4 simulated CPU devices, and
on the GPUs of the machine if it has any.

    .venv/bin/python -m benchmarks.devices --out /tmp/devices.md

Each device count runs in a process of its own: JAX reads
`XLA_FLAGS=--xla_force_host_platform_device_count=N` once, when it starts. Simulated
devices share the machine's cores, so on a small machine this shows that the
sharded epoch works and what it costs, not a speed-up (functional scaling only).
(`python -m benchmarks.run_all` runs it with the other scripts.)
"""

import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bioflax_eqx as bfx

from . import _timing as T


# The repository root: where `python -m benchmarks.devices` finds the package.
_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Setup:
    width: int
    depth: int
    rules: tuple[str, ...]
    batch: int  # the global batch, split over the devices
    counts: tuple[int, ...]  # simulated CPU devices
    rounds: int
    data_limit: int | None
    gpus: bool  # also on the machine's GPUs, if it has any
    smoke: bool


FULL = Setup(1024, 2, ("bp", "fa"), 128, (1, 2, 4), 3, None, True, False)
# One process (of two devices) only: the suite runs the smoke test on every change.
SMOKE = Setup(16, 1, ("fa",), 16, (2,), 1, 256, False, True)


# ------------------------------------------------ one device count, in its process


def _epochs(setup: Setup, devices: int, data_dir: str | None) -> dict[str, Any]:
    """Times whole epochs of every rule on the first `devices` devices."""
    x, y = T.mnist(data_dir, setup.data_limit)
    # As the trainer does: one device runs without a mesh.
    mesh = None if devices == 1 else Mesh(np.array(jax.devices()[:devices]), ("data",))

    def placed(tree):
        if mesh is None:
            return tree
        replicated = NamedSharding(mesh, P())
        return jax.tree_util.tree_map(
            lambda a: jax.device_put(a, replicated) if eqx.is_array(a) else a, tree
        )

    optimizer = T.adam()
    entries: dict[str, Callable[[], Any]] = {}
    for rule in setup.rules:
        model = bfx.MLP(
            int(x.shape[1]),
            10,
            setup.width,
            setup.depth,
            rule=rule,
            dtype=T.DTYPE,
            key=jax.random.key(0),
        )
        params, static = eqx.partition(model, bfx.trainable(model))
        args = placed((params, static, optimizer.init(params), x, y, jax.random.key(1)))
        settings = dict(
            optimizer=optimizer,
            loss_fn=T.batch_loss,
            batch_size=setup.batch,
            mesh=mesh,
        )
        with jax.numpy_dtype_promotion("standard"):
            compiled = bfx.train_epoch.lower(  # pyright: ignore[reportFunctionMemberAccess]
                *args, **settings
            ).compile()
        entries[rule] = lambda compiled=compiled, args=args, settings=settings: (
            compiled(*args, **settings)
        )
    t = T.interleaved(entries, setup.rounds)
    examples = (int(x.shape[0]) // setup.batch) * setup.batch
    return {
        "device_kind": jax.devices()[0].device_kind,
        "examples_per_s": {rule: examples / t[rule] for rule in setup.rules},
    }


def _worker(argv: Sequence[str]) -> None:
    fields = json.loads(argv[0])  # `dataclasses.asdict(setup)`: lists for tuples
    setup = Setup(
        **{**fields, "rules": tuple(fields["rules"]), "counts": tuple(fields["counts"])}
    )
    devices, data_dir = int(argv[1]), argv[2] or None
    print(json.dumps(_epochs(setup, devices, data_dir)))


def _in_process(
    setup: Setup, devices: int, data_dir: str | None, env: dict[str, str]
) -> dict[str, Any]:
    """`_epochs` in a fresh process with the environment `env`."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.devices",
            "--worker",
            json.dumps(dataclasses.asdict(setup)),
            str(devices),
            data_dir or "",
        ],
        env={**os.environ, **env},
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"the benchmark on {devices} devices failed:\n{result.stderr[-4000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _gpu_count() -> int:
    """GPUs that JAX sees here (0 where jaxlib has no GPU support), asked in a
    process of its own so that this one never claims their memory."""
    probe = "import jax; print(len(jax.devices('gpu')))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


# ----------------------------------------------------------------------- report


def _table(setup: Setup, runs: dict[int, dict[str, Any]]) -> list[str]:
    counts = list(runs)
    lines = [
        "| rule | " + " | ".join(f"{n} device{'s' * (n > 1)}" for n in counts) + " |",
        "| --- " * (len(counts) + 1) + "|",
    ]
    for rule in setup.rules:
        one = runs[counts[0]]["examples_per_s"][rule]
        cells = [
            f"{runs[n]['examples_per_s'][rule]:,.0f} /s "
            f"({T.ratio(runs[n]['examples_per_s'][rule], one)})"
            for n in counts
        ]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def run(
    setup: Setup, data_dir: str | None, use_torch: bool
) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """Runs every device count; returns the report's lines (no targets)."""
    del use_torch
    started = datetime.datetime.now().astimezone()
    load_start = T.load()
    cpu: dict[int, dict[str, Any]] = {}
    for n in setup.counts:
        print(f"devices: {n} simulated CPU device(s) ...")
        env = {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
        }
        cpu[n] = _in_process(setup, n, data_dir, env)
    gpus = _gpu_count() if setup.gpus else 0
    gpu: dict[int, dict[str, Any]] = {}
    for n in sorted({1, 2, 4, gpus} & set(range(1, gpus + 1))):
        print(f"devices: {n} GPU(s) ...")
        gpu[n] = _in_process(setup, n, data_dir, {"JAX_PLATFORMS": "cuda"})
    load_end = T.load()

    sizes = "-".join(str(n) for n in (784, *[setup.width] * setup.depth, 10))
    cores = os.cpu_count()
    lines: list[str] = []
    add = lines.append
    add(
        f"`python -m benchmarks.devices`, run {started:%Y-%m-%d %H:%M %Z} (load "
        f"average {load_start} at start, {load_end} at the end). Whole MNIST epochs of "
        f"`bfx.train_epoch(..., mesh=mesh)`: MLP {sizes}, float32, "
        f"{T.ADAM}, a global batch of {setup.batch} split evenly over "
        "the devices, the parameters and optimiser state replicated; median of "
        f"{setup.rounds} rounds, each device count in a process of its own (so, "
        "unlike the other ratios of the benchmarks, not interleaved). Examples per "
        "second, and × the first column.\n"
    )
    add(f"### Simulated CPU devices ({cores} cores)\n")
    add(
        f"`XLA_FLAGS=--xla_force_host_platform_device_count=N`: the N devices share "
        f"the machine's {cores} cores, so on a {cores}-core machine this shows "
        "**functional scaling only** (the sharded epoch runs, and what splitting "
        "each batch and summing the gradients costs), not a speed-up.\n"
    )
    lines += _table(setup, cpu)
    if gpu:
        kind = next(iter(gpu.values()))["device_kind"]
        add(f"### GPUs ({kind})\n")
        lines += _table(setup, gpu)
    elif setup.gpus:
        add("No GPU on this machine: no GPU figures.\n")
    return lines, []


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return
    T.script_main("Data-parallel epochs on 1, 2 and 4 devices.", run, SMOKE, FULL, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
