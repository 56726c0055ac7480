"""The known trap, checked in what XLA compiles: a rule's backward pass must leave
the weight gradient to ordinary autodiff. A custom backward that returned each
example's kernel gradient under `jax.vmap` would make XLA build batch × kernel
tensors and sum them; no such tensor may appear in any rule's compiled gradient."""

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import bioflax_eqx as bfx


RULES = ("fa", "kp", "usf", "brsf", "frsf")


def _mse_loss(model, x, t, key):
    y = jax.vmap(lambda xi: model(xi, key=key))(x)
    return 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))


# The HLO check: sizes chosen so that no activation has a kernel's size.
H_BATCH, H_IN, H_C1, H_C2, H_OUT, H_K, H_SIDE = 5, 3, 7, 11, 13, 2, 10
H_POOLED = (H_SIDE - H_K + 1) // 2  # 4
H_FLAT = H_C2 * (H_POOLED - H_K + 1) ** 2  # 99
KERNEL_SIZES = {
    H_C1 * H_IN * H_K * H_K,  # 84
    H_C2 * H_C1 * H_K * H_K,  # 308
    H_OUT * H_FLAT,  # 1287
}


def _hlo_net(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(H_IN, H_C1, H_K, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Conv2d(H_C1, H_C2, H_K, key=k2),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(H_FLAT, H_OUT, key=k3),
        ]
    )


def compiled_gradient_hlo(model) -> str:
    x = jnp.zeros((H_BATCH, H_IN, H_SIDE, H_SIDE))
    t = jnp.zeros((H_BATCH, H_OUT))
    params, static = eqx.partition(model, eqx.is_array)

    def grad(params, x, t, key):
        return eqx.filter_grad(_mse_loss)(eqx.combine(params, static), x, t, key)

    text = jax.jit(grad).lower(params, x, t, jax.random.key(0)).compile().as_text()
    assert text is not None
    return text


def per_example_kernel_shapes(hlo: str) -> list[str]:
    """Every tensor of a batch of kernels: a batch axis and the other axes holding
    exactly a kernel's number of entries (also when reshaped)."""
    found = []
    for dims in re.findall(r"f(?:32|64)\[([\d,]+)\]", hlo):
        sizes = [int(d) for d in dims.split(",")]
        if H_BATCH not in sizes:
            continue
        rest = list(sizes)
        rest.remove(H_BATCH)
        if math.prod(rest) in KERNEL_SIZES:
            found.append(dims)
    return found


@pytest.mark.parametrize("rule", ["bp", *RULES])
def test_no_per_example_kernel_gradient(rule, getkey):
    model = _hlo_net(getkey())
    if rule != "bp":
        model = bfx.convert(model, rule, key=getkey())
    assert per_example_kernel_shapes(compiled_gradient_hlo(model)) == []


def test_the_hlo_check_catches_per_example_kernels(getkey):
    # The trap: a custom backward returning each example's kernel gradient, which
    # JAX then sums over the batch.
    @jax.custom_vjp
    def conv(w, x):
        return lax.conv_general_dilated(x[None], w, (1, 1), "VALID")[0]

    def fwd(w, x):
        return conv(w, x), (w, x)

    def bwd(res, g):
        w, x = res
        _, pullback = jax.vjp(
            lambda w_, x_: lax.conv_general_dilated(x_[None], w_, (1, 1), "VALID")[0],
            w,
            x,
        )
        return pullback(g)

    conv.defvjp(fwd, bwd)  # pyright: ignore[reportFunctionMemberAccess]

    class Naive(eqx.Module):
        net: eqx.nn.Sequential

        def __call__(self, x, *, key=None):
            c1, c2 = self.net.layers[0], self.net.layers[3]
            h = jax.nn.relu(conv(c1.weight, x) + c1.bias)  # pyright: ignore
            h = self.net.layers[2](h)
            h = jax.nn.relu(conv(c2.weight, h) + c2.bias)  # pyright: ignore
            return self.net.layers[6](jnp.ravel(h))

    shapes = per_example_kernel_shapes(compiled_gradient_hlo(Naive(_hlo_net(getkey()))))
    assert shapes != []
