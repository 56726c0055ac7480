"""Max pooling over windows that tile the input, by a reshape."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray


class BlockMaxPool(eqx.Module):
    """An `eqx.nn.MaxPool1d/2d/3d` whose windows tile the input (stride equal to
    the kernel size, no padding), computed by a reshape and a maximum over each
    block; the gradient goes to the first maximum of each window in row-major
    order, as `lax.reduce_window`'s does. Its backward pass is one select on the
    saved index of that maximum, where XLA:CPU lowers `reduce_window`'s gradient
    to index tensors and a scatter, several times slower inside loops.
    """

    pool: eqx.nn.MaxPool1d | eqx.nn.MaxPool2d | eqx.nn.MaxPool3d

    def __init__(self, pool: eqx.nn.MaxPool1d | eqx.nn.MaxPool2d | eqx.nn.MaxPool3d):
        """**Arguments:**

        - `pool`: the pooling layer to compute; its windows must tile the input
            ([`bioflax_eqx.BlockMaxPool.fits`][]).
        """
        if not self.fits(pool):
            raise ValueError(
                "BlockMaxPool computes a max pool whose stride equals its kernel "
                f"size, without padding, got {pool!r}."
            )
        self.pool = pool

    @staticmethod
    def fits(pool: object) -> bool:
        """Whether `pool` is a max pool that `BlockMaxPool` can compute."""
        return (
            isinstance(pool, eqx.nn.MaxPool1d | eqx.nn.MaxPool2d | eqx.nn.MaxPool3d)
            and tuple(pool.stride) == tuple(pool.kernel_size)
            and all(p == (0, 0) for p in pool.padding)
            and not pool.use_ceil
        )

    @jax.named_scope("bfx.BlockMaxPool")
    def __call__(
        self, x: Float[Array, " channels *spatial"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " channels *pooled"]:
        """**Arguments:**

        - `x`: one input, `(channels, *spatial)`.
        - `key`: ignored.

        **Returns:**

        The pooling layer's output.
        """
        del key
        kernel = tuple(self.pool.kernel_size)
        if x.ndim != len(kernel) + 1:
            raise ValueError(
                f"{type(self.pool).__name__} takes one input of rank "
                f"{len(kernel) + 1}, got shape {x.shape}."
            )
        return _block_max(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max(x: Array, kernel: tuple[int, ...]) -> Array:
    blocks, _ = _blocks(x, kernel)
    return jnp.max(blocks, axis=-1)


def _blocks(x: Array, kernel: tuple[int, ...]) -> tuple[Array, tuple[int, ...]]:
    """`x` cropped to whole windows, as `(channels, *pooled, window)`; and the
    cropped shape."""
    pooled = [n // k for n, k in zip(x.shape[1:], kernel)]
    cropped = x[(slice(None), *(slice(0, p * k) for p, k in zip(pooled, kernel)))]
    split = [x.shape[0]] + [d for p, k in zip(pooled, kernel) for d in (p, k)]
    order = [0, *range(1, 2 * len(kernel), 2), *range(2, 2 * len(kernel) + 1, 2)]
    blocks = cropped.reshape(split).transpose(order)
    return blocks.reshape(*blocks.shape[: len(kernel) + 1], -1), cropped.shape


def _block_max_fwd(x, kernel):
    blocks, _ = _blocks(x, kernel)
    # argmax takes the first maximum: the element reduce_window's gradient picks.
    return jnp.max(blocks, axis=-1), (jnp.argmax(blocks, axis=-1), x.shape)


def _block_max_bwd(kernel, residuals, grad):
    index, shape = residuals
    n = len(kernel)
    window = lax.broadcasted_iota(index.dtype, (*index.shape, math.prod(kernel)), n + 1)
    blocks = jnp.where(window == index[..., None], grad[..., None], 0)
    pooled = index.shape[1:]
    blocks = blocks.reshape(*index.shape, *kernel)
    order = [0] + [i for j in range(n) for i in (1 + j, 1 + n + j)]
    cropped = blocks.transpose(order).reshape(
        shape[0], *(p * k for p, k in zip(pooled, kernel))
    )
    pad = [(0, 0, 0)] + [(0, s - c, 0) for s, c in zip(shape[1:], cropped.shape[1:])]
    return (lax.pad(cropped, jnp.zeros((), cropped.dtype), pad),)


_block_max.defvjp(_block_max_fwd, _block_max_bwd)
