"""The CIFAR-shaped conv nets, `bfx.vgg` and `bfx.resnet20` (batch norm), as the
trainer builds them: whole epochs of every rule through the library's own loop
(`bfx.train_epoch_with_state`) relative to backprop, and against the same networks
in PyTorch (`_torch_cifar.py`) with backprop and FA.

    .venv-bench/bin/python -m benchmarks.cifar --out /tmp/cifar.md

The input is random (3×32×32 float32, labels 0..9): CIFAR-10 itself need not be on
the machine, and the speed does not depend on the pixels. (`python -m
benchmarks.run_all` runs it with the other scripts and writes `results.md`.)
"""

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import bioflax_eqx as bfx

from . import _timing as T, _torch, conv_ops


IMAGE = (3, 32, 32)
CLASSES = 10
MODELS = {"vgg": ("VGG", bfx.vgg), "resnet20": ("ResNet-20", bfx.resnet20)}
EPOCH_TARGET = 1.05  # every rule's epoch ≤ this × BP's ...
DFA_TARGET = 0.90  # ... but DFA's, which skips the backward chain
TORCH_TARGET = 1.0  # JAX epochs at least as fast as PyTorch's (issue 16)


@dataclasses.dataclass(frozen=True)
class Setup:
    rules: tuple[str, ...]
    models: tuple[str, ...]
    batch: int
    steps: int  # per epoch: the data set is `steps * batch` random images
    epoch_repeats: int
    smoke: bool
    op_repeats: int  # rounds of ResNet-20's per-op table


# 5 rounds of 24 steps: the time of 3 rounds of 40, a steadier median.
FULL = Setup(bfx.RULES, tuple(MODELS), 128, 24, 5, False, 5)
SMOKE = Setup(("bp", "fa"), tuple(MODELS), 8, 2, 1, True, 1)


def random_data(setup: Setup) -> tuple[jax.Array, jax.Array]:
    n = setup.steps * setup.batch
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, *IMAGE), jnp.float32)
    return x, jax.random.randint(ky, (n,), 0, CLASSES)


def model_for(name: str, rule: str) -> tuple[Any, Any]:
    """The model and its state (batch norm; `None` for VGG), as `bfx.train` builds
    them: the same initial weights for every rule, the rule's feedback from key 1."""
    plain = MODELS[name][1](IMAGE, CLASSES, jax.nn.relu, key=jax.random.key(0))
    model = bfx.convert(
        plain, rule, key=jax.random.key(1), error_features=CLASSES, input_shape=IMAGE
    )
    leaves = jax.tree_util.tree_leaves(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
    )
    if not any(isinstance(x, eqx.nn.StateIndex) for x in leaves):
        return model, None
    return eqx.nn.delete_init_state(model), eqx.nn.State(model)


def batch_loss(model, state, x, y, key):
    """The loss for `bfx.train_epoch_with_state`, as the trainer's: one key for the
    whole batch (brSF draws one feedback matrix per step); batch norm's statistics
    over the batch axis, its running averages carried in `state`."""
    if state is None:
        logits = jax.vmap(lambda xi: model(xi, key=key))(x)
    else:
        logits, state = jax.vmap(
            lambda xi, s: model(xi, s, key=key),
            axis_name=bfx.models.BATCH_AXIS,
            in_axes=(0, None),
            out_axes=(0, None),
        )(x, state)
    return jnp.mean(jax.vmap(bfx.cross_entropy)(logits, y)), (None, state)


def epoch_case(model, state, x, y, batch: int) -> tuple[Callable[[], Any], float]:
    """A whole epoch compiled ahead of time (trained through `eqx.partition(model,
    bfx.trainable(model))` with Adam), and the seconds its compilation took."""
    params, static = eqx.partition(model, bfx.trainable(model))
    optimizer = T.adam()
    opt_state = optimizer.init(params)
    key = jax.random.key(1)
    args = (params, static, state, opt_state, x, y, key)
    kwargs: dict[str, Any] = dict(
        optimizer=optimizer, loss_fn=batch_loss, batch_size=batch
    )
    start = time.perf_counter()
    # optax's bias correction mixes int32 and float: standard promotion, as in
    # `bfx.train`.
    with jax.numpy_dtype_promotion("standard"):
        lowered = bfx.train_epoch_with_state.lower(*args, **kwargs)  # pyright: ignore[reportFunctionMemberAccess]
        compiled = lowered.compile()
    return (lambda: compiled(*args, **kwargs)), time.perf_counter() - start


def run(
    setup: Setup, data_dir: str | None, use_torch: bool
) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """Times every model's epochs; returns the report's lines and the verdicts."""
    del data_dir  # random data
    x, y = random_data(setup)
    lines: list[str] = []
    add = lines.append
    verdicts: list[tuple[str, str, bool]] = []
    add(
        "The library's CIFAR conv nets as the trainer builds them (`bioflax-eqx "
        "train --model vgg|resnet20 --dataset cifar10`: ReLU, `bfx.convert(model, "
        "rule, key=..., error_features=10, input_shape=(3, 32, 32))`), on random "
        "3×32×32 float32 images with random labels 0..9 (the real CIFAR-10 is not "
        f"needed for timing). An epoch: {setup.steps} steps of batch {setup.batch} "
        "through `bfx.train_epoch_with_state` (one compiled call, shuffled on "
        'device; `conv_path="auto"`: on CPU, convolutions as slices and one `dot`), '
        f"{T.ADAM} over `eqx.partition(model, bfx.trainable(model))`; "
        "ResNet-20's batch norm over the batch, its running averages carried "
        "through the epoch. WM's epoch is its learning phase (FA's): the mirror "
        f"phase between steps is not timed. Median of {setup.epoch_repeats} "
        "rounds, each in a fresh random order. PyTorch: the same networks, eager, "
        "train mode, `torch.optim.Adam`, the same number of shuffled steps; FA "
        "with `torch.autograd.Function`s that send the input cotangent through a "
        "fixed random B.\n"
    )
    for name in setup.models:
        title = MODELS[name][0]
        print(f"{name}: compiling ...")
        cases: dict[str, tuple[Callable[[], Any], float]] = {}
        for rule in setup.rules:
            cases[rule] = epoch_case(*model_for(name, rule), x, y, setup.batch)
        entries: dict[Any, Callable[[], Any]] = {r: c[0] for r, c in cases.items()}
        if use_torch:
            from . import _torch_cifar

            for rule in (r for r in ("bp", "fa") if r in setup.rules):
                tc = _torch_cifar.epoch_case(name, rule, x, y, setup.batch)
                entries["torch", rule] = tc.epoch
        print(f"{name}: timing epochs ({setup.epoch_repeats} rounds) ...")
        te = T.interleaved(entries, setup.epoch_repeats, 1, seed=4, warm_up=False)

        add(f"### {title}\n")
        add("| rule | epoch ×BP | PyTorch epoch / JAX epoch | epoch compile |")
        add("| --- " * 4 + "|")
        for rule in setup.rules:
            e = te.paired(rule, "bp")
            torch_e = (
                te.paired(("torch", rule), rule)
                if ("torch", rule) in te.samples
                else None
            )
            add(
                f"| {rule} | {T.times(e)} | "
                f"{T.times(torch_e) if torch_e else ''} | {cases[rule][1]:.1f} s |"
            )
            if rule != "bp":
                lim = DFA_TARGET if rule == "dfa" else EPOCH_TARGET
                verdicts.append(
                    (f"{rule} {title} epoch ≤ {lim}× BP", T.times(e), e <= lim)
                )
            if torch_e:
                verdicts.append(
                    (
                        f"{rule} {title} epoch ≥ {TORCH_TARGET}× faster than PyTorch",
                        T.times(torch_e),
                        torch_e >= TORCH_TARGET,
                    )
                )
        e_bp = te["bp"]
        torch_bp = te.get(("torch", "bp"))
        add(
            f"\nBackprop's epoch: {e_bp:.2f} s"
            + (f" (PyTorch's: {torch_bp:.2f} s)" if torch_bp else "")
            + ".\n"
        )
    if "resnet20" in setup.models:
        print(f"resnet20: timing each op ({setup.op_repeats} rounds) ...")
        add("### ResNet-20's convolutions, op by op\n")
        torch_op = _torch.conv_op if use_torch else None
        layers = conv_ops.resnet_layers()
        lines += conv_ops.lines(setup.batch, setup.op_repeats, layers, torch_op)
    return lines, verdicts


def main(argv: Sequence[str] | None = None) -> None:
    T.script_main("VGG and ResNet-20 benchmarks.", run, SMOKE, FULL, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
