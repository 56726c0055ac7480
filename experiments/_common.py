"""What the experiment scripts share: a run through `bfx.train` that is read back
once finished (so an interrupted sweep continues where it stopped), and the table
cells."""

import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import statistics
import time

import bioflax_eqx as bfx


def finished_run(config: bfx.TrainConfig, report_only: bool) -> dict:
    """The summary of the run of `config` in `config.out`: read back if it finished
    with `config.epochs` epochs, else trained now (resumed from its checkpoint if an
    earlier attempt left one)."""
    if config.out is None:
        raise ValueError("an experiment's runs need an output folder (`out`)")
    summary = pathlib.Path(config.out) / "summary.json"
    if summary.exists():
        done = json.loads(summary.read_text())
        if done.get("status") == "completed" and done.get("epochs") == config.epochs:
            return done
    if report_only:
        raise SystemExit(f"no finished run in {config.out}")
    start = time.perf_counter()
    resume = (pathlib.Path(config.out) / "checkpoint.eqx").is_file()
    bfx.train(config, resume=resume, overwrite=not resume, quiet=True)
    print(f"{config.out}: {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(summary.read_text())


_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _run(fields: dict) -> dict:
    """One run in a worker process (a `TrainConfig` travels as its dict)."""
    return finished_run(bfx.TrainConfig.from_dict(fields), report_only=False)


def train_all(
    configs: list[bfx.TrainConfig], jobs: int, report_only: bool
) -> list[dict]:
    """The summaries of `configs`' runs, `jobs` at a time (one core each)."""
    if report_only or jobs == 1:
        return [finished_run(c, report_only) for c in configs]
    # Spawned workers start JAX afresh; each keeps to one thread (one core). Added
    # once, though a sweep calls this once per stage.
    flags = os.environ.get("XLA_FLAGS", "")
    if _ONE_THREAD not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_ONE_THREAD}"
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_run, [c.to_dict() for c in configs]))


def mean_std(values: list[float]) -> str:
    """`mean ± sample standard deviation` (± 0.00 for one value), two decimals."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def write_report(path: str, text: str) -> None:
    """Writes the Markdown report `text` to `path` (making its folder) and prints it."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
