"""Convolutions as strided slices and one matrix product (im2col).

XLA:CPU runs `lax.conv_general_dilated` inside a loop body (a training epoch's
`lax.scan`) through a slow generic path (jax-ml/jax#12868). The same convolution
written as one strided slice of the input per kernel tap, stacked, and one `dot`
with the reshaped kernel compiles to copies and a matrix product there too; its
weight gradient is ordinary autodiff (one product over the batch), its input
gradient one product and the slices' transposes. Where the kernel has few output
channels, one row of the product computes several neighbouring outputs (a banded
kernel matrix), so that the product has more columns and reads fewer patches.
[`bioflax_eqx.im2col_layers`][] swaps [`bioflax_eqx.Im2colConv`][] in for every
convolution of a model.
"""

import functools
import math
import typing
from collections.abc import Sequence
from typing import NamedTuple, cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_conv_input


def conv_im2col(
    x: Float[Array, " in_channels *spatial"],
    weight: Float[Array, " out_channels group_channels *kernel"],
    *,
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int],
    groups: int,
    block: int | None = None,
) -> Float[Array, " out_channels *out_spatial"]:
    """`lax.conv_general_dilated` of one example (channels first, no batch axis),
    with zero padding `padding`, window strides `stride`, kernel dilation `dilation`
    and `groups` feature groups, computed as stacked strided slices of `x` and one
    `dot` with the kernel: the same sums, in another order.

    **Arguments:**

    - `x`: one input, `(in_channels, *spatial)`.
    - `weight`: the kernel, `(out_channels, in_channels // groups, *kernel)`.
    - `stride`, `dilation`: one integer per spatial axis.
    - `padding`: `(low, high)` zeros per spatial axis (negative values crop).
    - `groups`: the feature group count; divides both channel counts.
    - `block`: how many neighbouring outputs along the last spatial axis one row
        of the product computes: its patch spans their joint window, and the
        kernel becomes a banded matrix with `block` times the columns. It must
        divide the output's last axis, and be 1 with feature groups. `None` (the
        default): 4, or the largest divisor of the output's last axis below it,
        for kernels at least 5 wide with at most 16 output channels and no
        groups (LeNet-5's, where it makes a training epoch on CPU 0.83–0.89× as
        long); 1 otherwise.

    **Returns:**

    The convolution, `(out_channels, *out_spatial)`.
    """
    in_channels, *spatial = x.shape
    out_channels, group_channels, *kernel = weight.shape
    if in_channels != group_channels * groups:
        raise ValueError(
            f"the kernel takes {group_channels * groups} input channels "
            f"({groups} group(s) of {group_channels}), got an input of shape "
            f"{x.shape}."
        )
    padded_spatial = [n + lo + hi for n, (lo, hi) in zip(spatial, padding)]
    out_spatial = [
        (n - d * (k - 1) - 1) // s + 1
        for n, k, d, s in zip(padded_spatial, kernel, dilation, stride)
    ]
    if min(out_spatial, default=1) < 1:
        raise ValueError(
            f"the kernel {tuple(kernel)} (dilation {tuple(dilation)}) does not fit "
            f"the padded input of spatial shape {tuple(padded_spatial)}."
        )
    if block is None:
        block = _default_block(out_channels, kernel[-1], out_spatial[-1], groups)
    if block < 1 or out_spatial[-1] % block or (groups > 1 and block > 1):
        raise ValueError(
            f"block must be a divisor of the output's last axis ({out_spatial[-1]})"
            f" and 1 with feature groups, got block={block}, groups={groups}."
        )
    windows = _Windows(
        tuple(map(tuple, padding)),  # pyright: ignore[reportArgumentType]
        tuple(kernel),
        tuple(dilation),
        tuple(stride),
        tuple(out_spatial),
    )
    if block > 1:
        # `block` outputs `stride` apart along the last axis read one window of
        # `span` inputs: that axis's taps are the span's offsets, strided by the
        # block's stride.
        span = (block - 1) * stride[-1] + (kernel[-1] - 1) * dilation[-1] + 1
        windows = windows._replace(
            kernel=(*kernel[:-1], span),
            dilation=(*dilation[:-1], 1),
            stride=(*stride[:-1], block * stride[-1]),
            out=(*out_spatial[:-1], out_spatial[-1] // block),
        )
    # (positions, channels · taps), channel-major as the kernel's rows: under
    # `jax.vmap` the batch axis joins the positions, and the product is one
    # (batch · positions, channels · taps) matmul.
    positions = math.prod(out_spatial) // block
    patches = cast(Array, _taps(x, windows)).reshape(positions, -1)
    if groups == 1 and block == 1:
        out = patches @ weight.reshape(out_channels, -1).T
    elif groups == 1:
        span = windows.kernel[-1]  # the blocked axis's taps
        out = patches @ _banded(weight, block, stride[-1], dilation[-1], span)
    else:
        patches = patches.reshape(positions, groups, -1)
        kernel_rows = weight.reshape(groups, out_channels // groups, -1)
        out = jnp.einsum("pgk,gok->pgo", patches, kernel_rows)
    # (*out_spatial[:-1], last // block, out_channels, block), channels to the front.
    out = out.reshape(*out_spatial[:-1], out_spatial[-1] // block, out_channels, block)
    return jnp.moveaxis(out, -2, 0).reshape(out_channels, *out_spatial)


def _default_block(
    out_channels: int, kernel_width: int, out_width: int, groups: int
) -> int:
    """`conv_im2col`'s default `block`.

    A product with few output channels runs far below the machine's matmul peak,
    bound by the patches' memory traffic. Blocks of 4 outputs along a 5-wide kernel
    do 8/5 of the arithmetic on 2/5 of the patches, with 4 times the columns.
    Measured on 2 CPU cores, backprop's training epochs paired with the same
    without blocks: LeNet-5's convolutions (6 and 16 channels, 5×5) in blocks of 4
    made its epoch 0.83–0.89× as long (9 and 11 rounds). With 3×3 kernels, blocks
    of up to 4 that make 64 columns made ResNet-20's epoch (16 to 64 channels)
    1.07× as long and VGG's (32 to 128) 1.02×; blocks of up to 2, 1.0× and 1.03×
    (3 rounds each); so 3×3 kernels keep one output per row.
    """
    if groups != 1 or out_channels > 16 or kernel_width < 5:
        return 1
    return max(b for b in range(1, 5) if out_width % b == 0)


def _banded(weight: Array, block: int, stride: int, dilation: int, span: int) -> Array:
    """The kernel as the `(channels · taps, out_channels · block)` matrix that
    maps a block's patch to its `block` outputs: output `q` of the block applies
    the kernel's last axis, dilated, at offset `q · stride` of the span, zeros
    elsewhere."""
    out_channels, extent = weight.shape[0], (weight.shape[-1] - 1) * dilation + 1
    zero = jnp.zeros((), weight.dtype)
    no_pad = [(0, 0, 0)] * (weight.ndim - 1)
    shifted = [
        lax.pad(
            weight,
            zero,
            [*no_pad, (q * stride, span - q * stride - extent, dilation - 1)],
        )
        for q in range(block)
    ]
    banded = jnp.stack(shifted, axis=-1).reshape(out_channels, -1, block)
    return jnp.moveaxis(banded, 0, 1).reshape(-1, out_channels * block)


class _Windows(NamedTuple):
    padding: tuple[tuple[int, int], ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    out: tuple[int, ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _taps(x: Array, windows: _Windows) -> Array:
    """`(*out, channels, *kernel)`: the input, channels last and padded, then for
    each spatial axis from the last to the first, one strided slice per kernel
    offset along it, stacked after the channels. Channels last, so that the result
    is the `(positions, channels · taps)` matrix of the product; one axis at a time,
    so that each stack has a handful of operands (a kernel's width, not its
    size), which XLA fuses into one pass."""
    n = len(windows.kernel)
    h = lax.pad(
        jnp.moveaxis(x, 0, -1),
        jnp.zeros((), x.dtype),
        [(lo, hi, 0) for lo, hi in windows.padding] + [(0, 0, 0)],
    )
    for axis in reversed(range(n)):
        d, s, out = windows.dilation[axis], windows.stride[axis], windows.out[axis]
        h = jnp.stack(
            [
                lax.slice_in_dim(h, k * d, k * d + (out - 1) * s + 1, s, axis)
                for k in range(windows.kernel[axis])
            ],
            axis=n + 1,
        )
    return h


def _taps_fwd(x: Array, windows: _Windows) -> tuple[Array, tuple[int, ...]]:
    return _taps(x, windows), x.shape


def _taps_bwd(windows: _Windows, shape: tuple[int, ...], grad: Array) -> tuple[Array]:
    # The slices' transposes, axis by axis: each offset's cotangent padded back
    # into place along that axis, summed.
    n = len(windows.kernel)
    zero = jnp.zeros((), grad.dtype)
    for axis in range(n):
        d, s, out = windows.dilation[axis], windows.stride[axis], windows.out[axis]
        lo, hi = windows.padding[axis]
        size = shape[1 + axis] + lo + hi
        total = zero
        for k in range(windows.kernel[axis]):
            config = [(0, 0, 0)] * (grad.ndim - 1)
            config[axis] = (k * d, size - k * d - (out - 1) * s - 1, s - 1)
            total = total + lax.pad(
                lax.index_in_dim(grad, k, n + 1, False), zero, config
            )
        grad = total
    unpad = [(-lo, -hi, 0) for lo, hi in windows.padding] + [(0, 0, 0)]
    grad = lax.pad(grad, zero, unpad)
    # XLA:CPU would fuse these sums of pads into the layer before's backward (a
    # pool's gradient, which reads each element several times) and recompute them
    # there, several times slower. It does not duplicate an expensive op: dividing
    # by a one that it cannot prove is one stores the sum once, unchanged.
    one = jnp.where(grad > jnp.inf, 2, 1).astype(grad.dtype)
    return (jnp.moveaxis(grad / one, -1, 0),)


_taps.defvjp(_taps_fwd, _taps_bwd)


class Im2colConv(eqx.Module):
    """Any `eqx.nn.Conv` (`Conv1d/2d/3d`, every stride, padding, padding mode,
    dilation and group count), computed by [`bioflax_eqx.conv_im2col`][]: the same
    function as the wrapped layer, fast inside XLA:CPU loops.

    `weight` and `bias` are the wrapped layer's, so a rule wrapper around it (or
    `eqx.tree_at(lambda m: m.weight, ...)`) sees the convolution's own arrays.
    """

    conv: eqx.nn.Conv

    def __init__(self, conv: eqx.nn.Conv):
        """**Arguments:**

        - `conv`: the convolution to compute.
        """
        if not isinstance(conv, eqx.nn.Conv):
            raise ValueError(
                f"Im2colConv computes an `eqx.nn.Conv`, got {type(conv).__name__}."
            )
        self.conv = conv

    # Not instrumented by jaxtyping's import hook: `eqx.tree_at(lambda m: m.weight,
    # ...)`, as the rules swap in their feedback, reads it with placeholders.
    @property
    @typing.no_type_check
    def weight(self) -> Float[Array, " out_channels group_channels *kernel"]:
        """The wrapped convolution's kernel."""
        return self.conv.weight

    @property
    @typing.no_type_check
    def bias(self) -> Float[Array, " out_channels *ones"] | None:
        """The wrapped convolution's bias, or `None`."""
        return self.conv.bias

    @jax.named_scope("bfx.Im2colConv")
    def __call__(
        self,
        x: Float[Array, " in_channels *spatial"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " out_channels *out_spatial"]:
        """**Arguments:**

        - `x`: one input, `(in_channels, *spatial)`.
        - `key`: ignored.

        **Returns:**

        The wrapped convolution's output.
        """
        del key
        conv = self.conv
        check_conv_input(conv, x, type(conv).__name__)
        padding = conv.padding
        if conv.padding_mode != "ZEROS":
            x = conv._nonzero_pad(x)  # the layer's own reflect/replicate/circular pad
            padding = "VALID"
        if isinstance(padding, str):
            dilated = [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
            padding = lax.padtype_to_pads(x.shape[1:], dilated, conv.stride, padding)
        out = conv_im2col(
            x,
            conv.weight,
            stride=conv.stride,
            padding=padding,
            dilation=conv.dilation,
            groups=conv.groups,
        )
        return out if conv.bias is None else out + conv.bias
