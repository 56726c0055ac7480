"""What every benchmark script shares: the interleaved-median timer, the machine's
description and load, the MNIST location, and the compiled programs (gradient,
optimiser step, whole epoch through `bfx.train_epoch`) of any Equinox model."""

import argparse
import dataclasses
import functools
import importlib.metadata
import os
import pathlib
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import bioflax_eqx as bfx

from . import _torch


DTYPE = jnp.float32
LR = 1e-3
# How the figures' text names `adam()`.
ADAM = f"`bfx.tie_feedback(optax.adam({LR}))`"


def adam() -> optax.GradientTransformation:
    """Adam as the library recommends it: Kolen-Pollack's feedback takes its weight's
    update instead of a second copy of the same state (`bfx.tie_feedback`); nothing
    changes for the other rules."""
    return bfx.tie_feedback(optax.adam(LR))


# ------------------------------------------------------------------------ timing


def block(tree: Any) -> None:
    jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call, over `calls` back-to-back calls."""
    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    block(out)
    return (time.perf_counter() - start) / calls


@dataclasses.dataclass
class Timings:
    """Seconds per call of each entry, one sample per round; their median, and
    their interquartile range over that median (how much the machine's load
    moved it)."""

    samples: dict[Any, list[float]]

    @functools.cached_property
    def median(self) -> dict[Any, float]:
        return {name: statistics.median(s) for name, s in self.samples.items()}

    @functools.cached_property
    def spread(self) -> dict[Any, float]:
        return {name: _spread(s) for name, s in self.samples.items()}

    def __getitem__(self, name: Any) -> float:
        return self.median[name]

    def get(self, name: Any) -> float | None:
        return self.median.get(name)

    def paired(self, a: Any, b: Any) -> float:
        """`a`'s time over `b`'s: the median over rounds of the two entries' ratio
        in each round. Both ran in the same round, seconds apart, so a change of
        the machine's load between rounds cancels in each ratio; a ratio of the
        two medians would take each median from rounds under different loads."""
        return statistics.median(
            x / y for x, y in zip(self.samples[a], self.samples[b], strict=True)
        )


def interleaved(
    entries: dict[Any, Callable[[], Any]],
    rounds: int,
    calls: int = 1,
    seed: int = 0,
    warm_up: bool = True,
) -> Timings:
    """Times every entry `rounds` times; each round runs each entry once (`calls`
    back-to-back calls), in a fresh random order, so that load changes hit all
    entries alike. Returns every round's sample of each entry."""
    for fn in entries.values() if warm_up else ():  # first-call allocations
        block(fn())
    samples: dict[Any, list[float]] = {name: [] for name in entries}
    order = list(entries)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name].append(time_call(entries[name], calls))
    return Timings(samples)


def _spread(samples: list[float]) -> float:
    if len(samples) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / statistics.median(samples)


def ratio(a: float, b: float) -> str:
    return times(a / b)


def times(x: float) -> str:
    return f"{x:.2f}×"


# ----------------------------------------------------------------------- machine


def machine() -> dict[str, str]:
    """The CPU (model, vector extensions), cores, memory and library versions."""
    cpu, flags = platform.processor() or "unknown", ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni")
                flags = " ".join(f for f in wanted if f in have)
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "CPU": f"{cpu} ({flags})" if flags else cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "Python": platform.python_version(),
        "JAX / jaxlib": f"{jax.__version__} / {importlib.metadata.version('jaxlib')}",
        "Equinox / optax": (
            f"{importlib.metadata.version('equinox')} / "
            f"{importlib.metadata.version('optax')}"
        ),
        "JAX backend": jax.default_backend(),
        "XLA threads": "all cores (XLA:CPU default)",
    }


def load() -> str:
    """The load average over 1, 5 and 15 minutes."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def default_data_dir() -> str | None:
    """`$BIOFLAX_EQX_DATA`, else the project's shared copy beside the repository,
    else None: the library's cache folder, downloading once if needed."""
    if os.environ.get("BIOFLAX_EQX_DATA"):
        return os.environ["BIOFLAX_EQX_DATA"]
    shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    return str(shared) if shared.is_dir() else None


def mnist(data_dir: str | None, limit: int | None):
    """The MNIST training split, float32, flattened (n, 784), integer labels."""
    dataset = bfx.load_dataset(
        "mnist",
        default_data_dir() if data_dir is None else data_dir,
        val_size=0,
        limit=limit,
        dtype=DTYPE,
    )
    return dataset.train.x, dataset.train.y


# ------------------------------------------------------------ compiled programs


def batch_loss(model, x, y, key):
    """The loss for `bfx.train_epoch`: one key for the whole batch (brSF draws one
    feedback matrix per step), no auxiliary output."""
    logits = jax.vmap(lambda xi: model(xi, key=key))(x)
    return jnp.mean(jax.vmap(bfx.cross_entropy)(logits, y)), None


def memory_stats(compiled) -> dict[str, int]:
    """Arguments + outputs + temporaries - donated (aliased) buffers, in bytes."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = ("argument", "output", "temp", "alias")
    out = {f: int(getattr(stats, f"{f}_size_in_bytes", 0)) for f in fields}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


@dataclasses.dataclass
class Case:
    """The compiled programs of one model under one rule, ready to call.

    - `grad()`: the gradient of the trained arrays (weights, biases, KP's feedback)
      of one batch;
    - `step()`: gradient + Adam update, as in a training loop (parameters and
      optimiser state donated and carried from call to call);
    - `epoch()`: a whole epoch, `bfx.train_epoch` (the library's own loop).
    """

    grad: Callable[[], Any]
    step: Callable[[], Any]
    epoch: Callable[[], Any]
    n_params: int  # trained parameters (what Adam updates)
    memory: dict[str, dict[str, int]]
    epoch_compile_s: float | None  # seconds to trace and compile the epoch


def build_case(
    model,
    x_all,
    y_all,
    batch: int,
    *,
    epochs: bool = True,
    conv_path: str = "auto",
) -> Case:
    """Compiles (ahead of time) the gradient, the step and the epoch of `model`,
    trained as the library recommends: `eqx.partition(model, bfx.trainable(model))`,
    so fixed feedback is neither differentiated nor handed to Adam."""
    params, static = eqx.partition(model, bfx.trainable(model))
    fixed, rest = eqx.partition(static, eqx.is_array)  # arrays travel as arguments
    optimizer = adam()
    opt_state = optimizer.init(params)

    def loss(params, fixed, x, y, key):
        return batch_loss(eqx.combine(params, fixed, rest), x, y, key)[0]

    def gradient(params, fixed, x, y, key):
        return jax.grad(loss)(params, fixed, x, y, key)

    def step(params, opt_state, fixed, x, y, key):
        grads = jax.grad(loss)(params, fixed, x, y, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    x, y = x_all[:batch], y_all[:batch]
    key = jax.random.key(1)
    # optax's bias correction mixes int32 and float: standard promotion, as in
    # `bfx.train`.
    with jax.numpy_dtype_promotion("standard"):
        grad_c = jax.jit(gradient).lower(params, fixed, x, y, key).compile()
        step_c = (
            jax.jit(step, donate_argnums=(0, 1))
            .lower(params, opt_state, fixed, x, y, key)
            .compile()
        )
        epoch_c = None
        compile_start = time.perf_counter()
        if epochs:
            epoch_c = bfx.train_epoch.lower(  # pyright: ignore[reportFunctionMemberAccess]
                params,
                static,
                opt_state,
                x_all,
                y_all,
                key,
                optimizer=optimizer,
                loss_fn=batch_loss,
                batch_size=batch,
                conv_path=conv_path,
            ).compile()
        compile_s = time.perf_counter() - compile_start if epochs else None
    holder = [jax.tree_util.tree_map(jnp.copy, (params, opt_state))]

    def carried_step():
        holder[0] = step_c(*holder[0], fixed, x, y, key)
        return holder[0]

    def epoch():
        assert epoch_c is not None, "compiled with epochs=False"
        return epoch_c(
            params,
            static,
            opt_state,
            x_all,
            y_all,
            key,
            optimizer=optimizer,
            loss_fn=batch_loss,
            batch_size=batch,
            conv_path=conv_path,
        )

    n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
    return Case(
        grad=lambda: grad_c(params, fixed, x, y, key),
        step=carried_step,
        epoch=epoch,
        n_params=n_params,
        memory={"grad": memory_stats(grad_c), "step": memory_stats(step_c)},
        epoch_compile_s=compile_s,
    )


def peak_matmul(n: int) -> tuple[Callable[[], Any], int]:
    """A large float32 matmul (this machine's matmul peak) and its FLOPs."""
    a = jax.random.normal(jax.random.key(2), (n, n), DTYPE)
    b = jax.random.normal(jax.random.key(3), (n, n), DTYPE)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    return (lambda: compiled(a, b)), 2 * n**3


def stream(n: int) -> tuple[Callable[[], Any], int]:
    """An elementwise pass over `n` float32 (this machine's memory bandwidth:
    each element read once and written once) and the bytes it moves. In place
    (the input donated, the output carried to the next call), as an optimiser
    updates its state: a fresh output buffer would time page faults."""
    x = jax.random.normal(jax.random.key(4), (n,), DTYPE)
    compiled = jax.jit(lambda a: -a, donate_argnums=0).lower(x).compile()
    holder = [x]

    def call():
        holder[0] = compiled(holder[0])
        return holder[0]

    return call, 2 * n * x.dtype.itemsize


def verdict_lines(verdicts: list[tuple[str, str, bool]]) -> list[str]:
    """The targets as a Markdown table."""
    out = ["| target | measured | met |", "| --- | --- | --- |"]
    out += [f"| {w} | {m} | {'yes' if ok else '**no**'} |" for w, m, ok in verdicts]
    return out


def script_main(
    description: str,
    run: Callable[..., tuple[list[str], list[tuple[str, str, bool]]]],
    smoke: Any,
    full: Any,
    argv: Sequence[str] | None,
) -> None:
    """The command line shared by the benchmark scripts: runs `run` (with `smoke`
    or `full` settings) and writes its report and target verdicts to `--out`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--data-dir", default=None, help="the MNIST IDX folder")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    setup = smoke if args.smoke else full
    lines, verdicts = run(setup, args.data_dir, _torch.available(args.no_torch))
    targets = verdict_lines(verdicts) if verdicts else []
    args.out.write_text("\n".join(lines + targets))
