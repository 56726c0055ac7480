"""The checks of tests/test_devices.py that need several devices, run in a process of
its own with four simulated CPU devices (JAX reads `XLA_FLAGS` once, when it starts
its backend, so the rest of the suite keeps one):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python tests/_devices_worker.py MNIST_DIR FOLDER

It trains on one device and on meshes of 4 and 2, and writes what it measured to
`FOLDER/facts.json` (runs go to `FOLDER/runs`), for the tests to assert on. The
conventions of the suite hold here too: strict dtype promotion, x64 enabled, every
warning an error, bioflax_eqx imported under jaxtyping's beartype hook."""

import functools
import json
import pathlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import install_import_hook


warnings.simplefilter("error")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)
with install_import_hook(
    "bioflax_eqx",
    "beartype.beartype(conf=beartype.BeartypeConf(strategy=beartype.BeartypeStrategy.On))",
):
    import bioflax_eqx as bfx
    from bioflax_eqx.training import _compiled


# The trainer's runs: 500 training, 100 validation and 600 test images, 10 steps of
# 48 (12 per device on 4). SGD with momentum: Adam turns gradient components that
# are zero but for rounding (uSF's, for one) into full steps, whose signs then
# differ from one reduction order to another.
TRAIN: dict[str, Any] = dict(
    dataset="mnist",
    limit=600,
    val_size=100,
    width=16,
    depth=1,
    batch_size=48,
    optimizer="momentum",
    lr=0.05,
    metrics_batch=100,
)
# Evaluated in chunks of 40 (not 1000), so that the 600 test and 100 validation
# images go through the sharded chunks and the whole remainder alike.
_compiled._EVAL_CHUNK = 40


def mesh_of(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), ("data",))


def put(tree: Any, mesh: Mesh) -> Any:
    replicated = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, replicated) if eqx.is_array(x) else x, tree
    )


def leaves(tree: Any) -> list[np.ndarray]:
    return [
        np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    ]


def max_difference(a: Any, b: Any) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(a), leaves(b)))


def placement(tree: Any) -> list[dict[str, Any]]:
    """Each array's devices and whether it is whole on each."""
    return [
        {
            "devices": len(x.sharding.device_set),
            "replicated": x.sharding.is_fully_replicated,
        }
        for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    ]


# ------------------------------------------------- every rule through bfx.train_epoch


def every_rule() -> dict[str, Any]:
    """One epoch of every rule on 1 device and on a mesh of 4: the rules' MLPs side
    by side in one model (one loss, the sum of theirs, so each gets its own
    gradient), so that this compiles two programs rather than sixteen."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(480, 12)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=480), jnp.int32)

    # Built in one compiled call, rather than eagerly one random draw at a time.
    @eqx.filter_jit
    def build(key):
        return tuple(
            bfx.MLP(12, 4, 16, 1, rule=rule, dtype=jnp.float32, key=key)
            for rule in bfx.RULES
        )

    models = build(jax.random.key(2))
    # WM's feedback is changed by the mirror step, so it is in `params`; every
    # fixed feedback gets a zero update.
    params, static = eqx.partition(models, eqx.is_inexact_array)
    optimizer = bfx.freeze_feedback(optax.sgd(0.1, momentum=0.9))
    opt_state = optimizer.init(params)
    after_step = functools.partial(
        bfx.mirror, lr=0.005, noise_std=1.0, decay=1.0, batch_size=16
    )
    seen: dict[str, Any] = {}

    def loss_fn(models, xb, yb, key):
        # Called while tracing: how the minibatch is laid out inside the scan.
        jax.debug.inspect_array_sharding(
            xb, callback=lambda s: seen.update(minibatch=s)
        )
        total = jnp.zeros((), jnp.float32)
        for model in models:
            logits = jax.vmap(lambda xi: model(xi, key=key))(xb)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            total = total + jnp.mean(losses)
        return total, None

    def call(epoch: Callable[..., Any], args: Any, batch_size: int, mesh: Any):
        """`epoch` (`bfx.train_epoch`, its `lower` or what that compiles)."""
        return epoch(
            *args,
            optimizer=optimizer,
            loss_fn=loss_fn,
            batch_size=batch_size,
            after_step=after_step,
            mesh=mesh,
        )

    args = (params, static, opt_state, x, y, jax.random.key(3))
    mesh = mesh_of(4)
    lower = bfx.train_epoch.lower  # pyright: ignore[reportFunctionMemberAccess]
    with jax.numpy_dtype_promotion("standard"):
        one, _, one_losses, _ = call(bfx.train_epoch, args, 48, None)
        # Compiled ahead of time, to read the program that then runs.
        compiled = call(lower, put(args, mesh), 48, mesh).compile()
        minibatch = seen["minibatch"]
        four, _, four_losses, _ = call(compiled, put(args, mesh), 48, mesh)
        try:
            call(bfx.train_epoch, put(args, mesh_of(2)), 45, mesh_of(2))
            indivisible = ""
        except ValueError as e:
            indivisible = str(e)
    return {
        "rules": {
            rule: {
                "difference": max_difference(a, b),
                "change": max_difference(a, p),
            }
            for rule, a, b, p in zip(bfx.RULES, one, four, params)
        },
        "losses_difference": float(np.max(np.abs(one_losses - four_losses))),
        "minibatch_devices": len(minibatch.device_set),
        "minibatch_shard": list(minibatch.shard_shape((48, 12))),
        "params": placement(four),
        "all_reduces": compiled.compiled.as_text().count(" all-reduce("),
        "indivisible": indivisible,
    }


# ------------------------------------------------------------------ the trainer


def own_net(key: jax.Array) -> Any:
    """A dense net with batch norm over the trainer's vmapped axis, "batch"."""
    k1, k2, k3 = jax.random.split(key, 3)
    net = eqx.nn.Sequential(
        [
            eqx.nn.Linear(784, 16, dtype=jnp.float32, key=k1),
            eqx.nn.BatchNorm(16, axis_name="batch", mode="batch", dtype=jnp.float32),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(16, 10, dtype=jnp.float32, key=k2),
        ]
    )
    return bfx.convert(net, "fa", key=k3)


def history(result: Any) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if not k.endswith("_time_s")}
        for r in result.history
    ]


def trainer(mnist_dir: str, runs: pathlib.Path) -> dict[str, Any]:
    """FA runs of a model with batch norm: on 1 device and on 4, and one resumed
    from 4 devices on 4, then 2, then 1."""
    net = own_net(jax.random.key(1))

    def train(name: str, resume: bool = False, **changes: Any) -> Any:
        fields = {**TRAIN, "model": "custom", "data_dir": mnist_dir, **changes}
        config = bfx.TrainConfig(**fields, out=str(runs / name))
        return bfx.train(config, model=net, resume=resume, quiet=True)

    facts: dict[str, Any] = {}
    one = train("one", epochs=2)
    four = train("four", devices=4, epochs=2)
    floats = eqx.is_inexact_array  # the running statistics, not the step count
    facts["parity"] = {
        "difference": max_difference(one.model, four.model),
        "state_difference": max_difference(
            eqx.filter(one.state, floats), eqx.filter(four.state, floats)
        ),
        "state_change": max_difference(
            eqx.filter(one.state, floats), eqx.filter(eqx.nn.State(net), floats)
        ),
        "histories": [history(one), history(four)],
        "params": placement(four.model),
        "state": placement(four.state),
    }

    class Killed(Exception):
        pass

    def kill(record: dict[str, Any]) -> None:
        raise Killed

    # Killed after epoch 1 of 2 and resumed on 4 devices: the same reduction order,
    # so the same bytes as the run never interrupted; then on 2 and on 1.
    try:
        fields = {**TRAIN, "model": "custom", "data_dir": mnist_dir}
        config = bfx.TrainConfig(
            **fields, devices=4, epochs=2, out=str(runs / "resumed")
        )
        bfx.train(config, model=net, quiet=True, callback=kill)
    except Killed:
        pass
    on4 = train("resumed", resume=True, devices=4, epochs=2)
    payloads = [
        (runs / name / "checkpoint.eqx").read_bytes().split(b"\n", 2)[2]
        for name in ("four", "resumed")
    ]
    on2 = train("resumed", resume=True, devices=2, epochs=3)
    on1 = train("resumed", resume=True, devices=1, epochs=4)
    straight = train("one", resume=True, epochs=4)
    facts["resume"] = {
        "same_bytes_on_4": payloads[0] == payloads[1],
        "same_history_on_4": history(on4) == history(four),
        "params_on_2": placement(on2.model),
        "params_on_1": placement(on1.model),
        "difference_to_1": max_difference(on1.model, straight.model),
        "state_difference_to_1": max_difference(on1.state, straight.state),
        "histories": [history(straight), history(on1)],
    }
    try:
        train("eight", devices=8, epochs=1)
        facts["too_many"] = ""
    except bfx.ConfigError as e:
        facts["too_many"] = f"{e.field}: {e}"
    facts["too_many_wrote"] = (runs / "eight").exists()
    return facts


def main(mnist_dir: str, folder: str) -> None:
    out = pathlib.Path(folder)
    facts = {"device_count": jax.device_count(), **every_rule()}
    facts["trainer"] = trainer(mnist_dir, out / "runs")
    (out / "facts.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
