"""Where a conv net's step spends its time, op by op: the forward pass, the weight
gradient and the input gradient of LeNet-5's convolutions and pools, or of
ResNet-20's 3×3 convolutions, on both
paths (`conv_path="xla"`: Equinox's layers; `"im2col"`: `bfx.im2col_layers`), as a
plain jitted call and inside a `lax.scan` (as in a training epoch). `conv.py`
and `cifar.py` put the tables in their reports."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

import bioflax_eqx as bfx

from . import _timing as T


SCAN_LENGTH = 8  # iterations of the loop that each op is timed in


Layers = list[tuple[str, Any, tuple[int, ...]]]


def lenet_layers() -> Layers:
    """LeNet-5's convolutions and pools on MNIST, with one example's input shape."""
    k1, k2 = jax.random.split(jax.random.key(0))
    conv1 = eqx.nn.Conv2d(1, 6, 5, padding=2, dtype=T.DTYPE, key=k1)
    conv2 = eqx.nn.Conv2d(6, 16, 5, dtype=T.DTYPE, key=k2)
    return [
        ("conv 1→6, 5×5, pad 2", conv1, (1, 28, 28)),
        ("max pool 2×2", eqx.nn.MaxPool2d(2, 2), (6, 28, 28)),
        ("conv 6→16, 5×5", conv2, (6, 14, 14)),
        ("max pool 2×2", eqx.nn.MaxPool2d(2, 2), (16, 10, 10)),
    ]


def _ops(layer) -> dict[str, Callable[..., Any]]:
    """`op(layer, x, g)` for the forward pass and the two gradients (`g` the
    output's cotangent); a pool has no weight."""

    def forward(layer, x, g):
        del g
        return jax.vmap(layer)(x)

    def input_gradient(layer, x, g):
        return jax.vjp(lambda x: jax.vmap(layer)(x), x)[1](g)[0]

    def weight_gradient(layer, x, g):
        arrays, rest = eqx.partition(layer, eqx.is_array)
        pullback = jax.vjp(lambda a: jax.vmap(eqx.combine(a, rest))(x), arrays)[1]
        return pullback(g)[0]

    ops = {"forward": forward, "input gradient": input_gradient}
    if eqx.is_array(getattr(layer, "weight", None)):
        ops["weight gradient"] = weight_gradient
    return ops


def _in_scan(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op` run `SCAN_LENGTH` times in a `lax.scan`, each iteration's input
    and cotangent depending on the last one's output (so nothing is hoisted out
    of the loop)."""

    def looped(layer, x, g):
        def body(carry, _):
            out = op(layer, x + carry, g + carry)
            leaves = jax.tree_util.tree_leaves(out)
            return carry + 1e-9 * sum(jnp.sum(a) for a in leaves), None

        return lax.scan(body, jnp.zeros((), x.dtype), None, length=SCAN_LENGTH)[0]

    return looped


def _bound(compiled, *args) -> Callable[[], Any]:
    return lambda: compiled(*args)


def resnet_layers() -> Layers:
    """ResNet-20's 3×3 convolutions on CIFAR, one per stage (stride 1, padding 1)."""
    keys = jax.random.split(jax.random.key(0), 3)
    return [
        (
            f"conv {c}→{c}, 3×3, {n}×{n}",
            eqx.nn.Conv2d(c, c, 3, padding=1, use_bias=False, dtype=T.DTYPE, key=k),
            (c, n, n),
        )
        for k, c, n in zip(keys, (16, 32, 64), (32, 16, 8))
    ]


def lines(
    batch: int,
    repeats: int,
    layers: Layers,
    torch_op: Callable[[Any, str, Any], Callable[[], Any] | None] | None = None,
) -> list[str]:
    """The per-op table of `layers`: milliseconds per call of each op, both
    paths, plain and in a loop (medians of `repeats` interleaved rounds), and
    with `torch_op(layer, op, x)` PyTorch's call of the op in a last column."""
    entries: dict[Any, Callable[[], Any]] = {}
    rows = []
    for i, (name, layer, shape) in enumerate(layers):
        x = jax.random.normal(jax.random.key(1), (batch, *shape), T.DTYPE)
        for op_name, op in _ops(layer).items():
            rows.append((i, name, op_name))
            torch_call = None if torch_op is None else torch_op(layer, op_name, x)
            if torch_call is not None:
                entries[i, op_name, "torch"] = torch_call
            for path, lower in (("xla", lambda m: m), ("im2col", bfx.im2col_layers)):
                model = lower(layer)
                g_shape = jax.eval_shape(lambda x: jax.vmap(model)(x), x).shape
                g = jax.random.normal(jax.random.key(2), g_shape, T.DTYPE)
                for where, fn in (("plain", op), ("scan", _in_scan(op))):
                    jitted = eqx.filter_jit(fn)  # `.lower` unknown to pyright
                    lowered = jitted.lower(model, x, g)  # pyright: ignore[reportFunctionMemberAccess]
                    compiled = lowered.compile()
                    entries[i, op_name, path, where] = _bound(compiled, model, x, g)
    t = T.interleaved(entries, repeats, 1, seed=4)

    def ms(i, op_name, path, where):
        scale = SCAN_LENGTH if where == "scan" else 1
        return f"{1e3 * t[i, op_name, path, where] / scale:.2f}"

    def torch_ms(i, op_name):
        seconds = t.get((i, op_name, "torch"))
        return "" if seconds is None else f"{1e3 * seconds:.2f}"

    out = [
        f"Per op, batch {batch}, float32: milliseconds per call as a plain jitted "
        f"call and per iteration inside a `lax.scan` of {SCAN_LENGTH} (as in an "
        "epoch); medians of interleaved rounds. `xla`: Equinox's layers "
        "(`lax.conv_general_dilated`, `lax.reduce_window`); `im2col`: "
        "`bfx.Im2colConv` and `bfx.BlockMaxPool`"
        + (
            "; PyTorch: `F.conv2d` and `torch.nn.grad.conv2d_input` / "
            "`conv2d_weight`, eager (convolutions only)."
            if torch_op
            else "."
        ),
        "",
        "| layer | op | xla, plain | xla, in scan | im2col, plain | im2col, in scan "
        + ("| PyTorch |" if torch_op else "|"),
        "| --- " * (7 if torch_op else 6) + "|",
    ]
    for i, name, op_name in rows:
        cells = [
            ms(i, op_name, p, w) for p in ("xla", "im2col") for w in ("plain", "scan")
        ]
        if torch_op:
            cells.append(torch_ms(i, op_name))
        out.append(f"| {name} | {op_name} | " + " | ".join(cells) + " |")
    out.append("")
    return out
