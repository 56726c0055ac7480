"""The benchmark script runs end to end at tiny sizes, so that it cannot rot. No
timing is asserted: the speed targets are checked in the benchmark's own report."""

import importlib.util
import pathlib
import sys

import pytest


BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bioflax_eqx_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_smoke_run_writes_a_report(bench, tmp_path, mnist_dir):
    out = tmp_path / "results.md"
    bench.main(
        ["--smoke", "--no-torch", "--out", str(out), "--data-dir", str(mnist_dir)]
    )
    text = out.read_text()
    assert "smoke run" in text
    for rule in ("bp", "kp", "dfa"):
        assert f"| {rule} |" in text
    for section in ("## MLP 784-16-10", "## Whole MNIST epochs", "## Targets"):
        assert section in text


def test_smoke_never_overwrites_the_results(bench):
    with pytest.raises(SystemExit):
        bench.main(["--smoke"])


def test_flop_count(bench):
    sizes, batch = [784, 1024, 1024, 10], 128
    layers = 784 * 1024 + 1024 * 1024 + 1024 * 10
    # Forward and weight gradient for every layer; no input cotangent for the data.
    chain = 1024 * 1024 + 1024 * 10
    assert bench.matmul_flops("bp", sizes, batch) == 2 * batch * (2 * layers + chain)
    assert bench.matmul_flops("fa", sizes, batch) == 2 * batch * (2 * layers + chain)
    # DFA's hidden layers read the 10 outputs' error instead of the next layer's.
    direct = 1024 * 10 + 1024 * 10
    assert bench.matmul_flops("dfa", sizes, batch) == 2 * batch * (2 * layers + direct)
