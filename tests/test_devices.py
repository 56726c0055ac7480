"""Data-parallel training (`TrainConfig.devices`, `bfx.train_epoch(mesh=...)`, the
multi-host launch).

The checks that need several devices run in processes of their own, with CPU devices
simulated by `XLA_FLAGS=--xla_force_host_platform_device_count=4` (JAX reads it once,
when it starts, so this process and the rest of the suite keep one device):
tests/_devices_worker.py measures, on 1, 2 and 4 devices, and the tests here assert
on what it found. A two-process launch on loopback (one device each, joined by
`jax.distributed`) runs beside it."""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys
from typing import Any

import pytest

import bioflax_eqx as bfx
from bioflax_eqx.training._cli import main

from .helpers import SMALL


WORKER = pathlib.Path(__file__).resolve().parent / "_devices_worker.py"
# Within this of each other: float32 parameters after an epoch on different device
# counts (the sums of the gradients in another order), and metrics of such runs.
PARAMS_TOL = 1e-5
METRIC_TOL = 1e-4
ANGLE_TOL = 0.1  # degrees: an angle near 0 is the arccos of a value near 1

# The processes of a multi-host run: the command line, with the plots and the
# progress bar left out (they cost seconds to import and add nothing here).
_LAUNCHED = """
import sys
sys.modules["matplotlib"] = None
sys.modules["tqdm"] = None
import jax
from bioflax_eqx.training._cli import main
status = main(sys.argv[1:])
print(f"processes {jax.process_count()}, devices {jax.device_count()}")
sys.exit(status)
"""


# LLVM's optimisations off: the programs compile in half the time, and nothing
# checked here (how XLA shards them, results across device counts) depends on them.
_FAST_COMPILE = "--xla_backend_optimization_level=0"


def _env(xla_flags: str = "") -> dict[str, str]:
    # No proxy may stand between the processes and the coordinator on loopback.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    flags = f"{_FAST_COMPILE} {xla_flags}".strip()
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_args(mnist_dir, out, **changes) -> list[str]:
    options = {**SMALL, "data_dir": mnist_dir, "out": out, "epochs": 1, **changes}
    args = ["train", "--rule", "fa"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


class _Processes:
    """The worker and the two processes of the launch, started together: they
    compile mostly on one thread each, so on two cores they overlap."""

    reference: Any = None  # a `bfx.TrainResult`

    def __init__(self, folder: pathlib.Path, mnist_dir: pathlib.Path):
        self.folder = folder
        self.worker = subprocess.Popen(
            [sys.executable, str(WORKER), str(mnist_dir), str(folder)],
            env=_env("--xla_force_host_platform_device_count=4"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        address = f"127.0.0.1:{_free_port()}"
        args = _run_args(mnist_dir, folder / "launched")
        self.launched = [
            subprocess.Popen(
                [sys.executable, "-c", _LAUNCHED, *args]
                + ["--coordinator-address", address, "--num-processes", "2"]
                + ["--process-id", str(rank)],
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]

    def facts(self) -> dict[str, Any]:
        output, _ = self.worker.communicate(timeout=600)
        assert self.worker.returncode == 0, output[-6000:]
        return json.loads((self.folder / "facts.json").read_text())

    def launch(self) -> list[tuple[int, str, str]]:
        results = []
        for process in self.launched:
            stdout, stderr = process.communicate(timeout=600)
            results.append((process.returncode, stdout, stderr))
        return results

    def stop(self) -> None:
        for process in (self.worker, *self.launched):
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def processes(tmp_path_factory, mnist_dir):
    started = _Processes(tmp_path_factory.mktemp("devices"), mnist_dir)
    try:
        # While they run: the one-device run that the launch is compared with.
        config = bfx.TrainConfig(**SMALL, data_dir=str(mnist_dir), epochs=1)
        started.reference = bfx.train(config, quiet=True)
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def facts(processes) -> dict[str, Any]:
    return processes.facts()


def _close(a: Any, b: Any, key: str) -> bool:
    if a is None or b is None or isinstance(a, int):
        return a == b
    if isinstance(a, list):  # the training-loss curve
        return len(a) == len(b) and all(_close(u, v, key) for u, v in zip(a, b))
    tol = ANGLE_TOL if "angle" in key else METRIC_TOL
    return math.isclose(a, b, rel_tol=METRIC_TOL, abs_tol=tol)


def _assert_histories_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        far = {k: (x[k], y[k]) for k in x if not _close(x[k], y[k], k)}
        assert not far, f"epoch {x['epoch']}: {far}"


def _on(placements: list[dict], devices: int) -> bool:
    """Every array whole on each of `devices` devices."""
    return bool(placements) and all(
        p == {"devices": devices, "replicated": True} for p in placements
    )


# ------------------------------------------------------------------ the rules


def test_every_rule_on_four_devices_equals_one_device(facts):
    assert facts["device_count"] == 4
    assert set(facts["rules"]) == set(bfx.RULES)
    for rule, found in facts["rules"].items():
        # Trained (the parameters moved), to the same parameters.
        assert found["change"] > 1e-2, rule
        assert found["difference"] < PARAMS_TOL, (rule, found)
    assert facts["losses_difference"] < METRIC_TOL


def test_the_epoch_is_sharded_as_the_docs_say(facts):
    # Inside the scan, each device holds a quarter of the 48 examples of a step.
    assert facts["minibatch_devices"] == 4
    assert facts["minibatch_shard"] == [12, 12]
    # The parameters and optimiser state come out whole on every device ...
    assert _on(facts["params"], 4)
    # ... because XLA sums the devices' gradients.
    assert facts["all_reduces"] >= 1
    # The trainer: the model and the batch-norm state replicated too.
    assert _on(facts["trainer"]["parity"]["params"], 4)
    assert _on(facts["trainer"]["parity"]["state"], 4)


# ---------------------------------------------------------------- the trainer


def test_the_trainer_with_batch_norm_on_four_devices_equals_one_device(facts):
    parity = facts["trainer"]["parity"]
    assert parity["difference"] < PARAMS_TOL
    # Batch norm's statistics are over the whole batch, across the devices' parts.
    assert parity["state_change"] > 1e-3
    assert parity["state_difference"] < PARAMS_TOL
    _assert_histories_close(*parity["histories"])


def test_checkpoints_resume_across_device_counts(facts):
    resume = facts["trainer"]["resume"]
    # On the same devices: the same bytes as a run never interrupted.
    assert resume["same_bytes_on_4"]
    assert resume["same_history_on_4"]
    # Then on 2 devices and on 1, placed anew.
    assert _on(resume["params_on_2"], 2)
    assert _on(resume["params_on_1"], 1)
    # 4 epochs on 4, 4, 2 and 1 devices: those of one device throughout, up to the
    # order of the sums.
    assert resume["difference_to_1"] < PARAMS_TOL
    assert resume["state_difference_to_1"] < PARAMS_TOL
    _assert_histories_close(*resume["histories"])


# ---------------------------------------------------------------- refusals


def test_refusals_on_four_devices(facts):
    assert facts["indivisible"].startswith(
        "`batch_size` must be a multiple of the mesh's 2 devices"
    )
    assert facts["trainer"]["too_many"] == (
        "devices: `devices` asks for 8 devices, but this process has 4 (cpu); on "
        "CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 simulates them."
    )
    assert not facts["trainer"]["too_many_wrote"]


def test_a_batch_the_devices_do_not_divide_is_refused():
    with pytest.raises(bfx.ConfigError) as info:
        bfx.TrainConfig(devices=4, batch_size=50)
    assert info.value.field == "batch_size"
    assert str(info.value) == (
        "`batch_size` must be a multiple of devices (4): each device takes an "
        "equal part of every batch; got 50."
    )


def test_more_devices_than_there_are_are_refused_before_any_work(tmp_path, capsys):
    # No data there: reading it first would fail otherwise.
    nowhere = tmp_path / "no data"
    config = bfx.TrainConfig(devices=2, data_dir=str(nowhere), out=str(tmp_path / "a"))
    with pytest.raises(bfx.ConfigError, match="asks for 2 devices, but this process"):
        bfx.train(config, quiet=True)
    args = _run_args(nowhere, tmp_path / "b", devices=2, batch_size=48)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "argument --devices: asks for 2 devices, but this process has 1 (cpu)" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- multi-host


def test_two_processes_on_loopback_train_as_one(processes):
    """`--coordinator-address/--num-processes/--process-id`: two processes of one
    device each make one mesh of two, and train as one device does; process 0
    alone reports and writes."""
    (rc0, out0, err0), (rc1, out1, err1) = processes.launch()
    assert rc0 == 0, err0[-4000:]
    assert rc1 == 0, err1[-4000:]
    assert "processes 2, devices 2" in out0 and "processes 2, devices 2" in out1
    assert "fa mlp on mnist, epoch 1, test accuracy" in out0
    assert "test accuracy" not in out1
    folder = processes.folder / "launched"
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "metrics.jsonl", "summary.json", "checkpoint.eqx"}

    launched = bfx.load_run(folder)
    assert launched.config.devices == 1
    _assert_histories_close(
        *[
            [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in h]
            for h in (processes.reference.history, launched.history)
        ]
    )
