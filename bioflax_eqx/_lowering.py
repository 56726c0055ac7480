"""How a training loop computes a model's convolutions: as Equinox's layers do
(`lax.conv_general_dilated`, `lax.reduce_window`), or as slices, reshapes and
matrix products ([`bioflax_eqx.Im2colConv`][], [`bioflax_eqx.BlockMaxPool`][]).

XLA:CPU runs convolutions and `reduce_window`'s gradient inside loop bodies (a
training epoch's `lax.scan`, an evaluation's `lax.map`) through slow paths
(jax-ml/jax#12868); the trainer lowers the model inside its compiled epoch and
evaluation on CPU ([`bioflax_eqx.TrainConfig`][]'s `conv_path`). The model you hold
keeps its Equinox layers, so parameters, checkpoints and metrics are unchanged.
"""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
from jax.sharding import Mesh
from jaxtyping import PyTree

from ._block_pool import BlockMaxPool
from ._im2col import Im2colConv


ConvPath = Literal["auto", "im2col", "xla"]
CONV_PATHS: tuple[str, ...] = ("auto", "im2col", "xla")


def _lowerable(node: object) -> bool:
    return isinstance(node, eqx.nn.Conv) or BlockMaxPool.fits(node)


def _lowered(node: object) -> bool:
    return isinstance(node, Im2colConv | BlockMaxPool)


def im2col_layers(model: PyTree) -> PyTree:
    """`model` with every `eqx.nn.Conv` in it (also inside rule wrappers and DFA
    layers) replaced by an [`bioflax_eqx.Im2colConv`][] of it, and every max pool
    whose windows tile its input by a [`bioflax_eqx.BlockMaxPool`][]: the same
    function and gradients (up to the order of float sums), the same arrays in the
    same order, so gradients with respect to the arrays of the result are
    gradients of `model`'s. [`bioflax_eqx.xla_layers`][] undoes it.

    **Arguments:**

    - `model`: any pytree.

    **Returns:**

    The same pytree, with those layers computed by slices, reshapes and `dot`s.
    """

    def lower(node: object) -> object:
        if isinstance(node, eqx.nn.Conv):
            return Im2colConv(node)
        if BlockMaxPool.fits(node):
            return BlockMaxPool(node)  # pyright: ignore[reportArgumentType]
        return node

    return jax.tree_util.tree_map(
        lower, model, is_leaf=lambda n: _lowerable(n) or _lowered(n)
    )


def xla_layers(model: PyTree) -> PyTree:
    """The inverse of [`bioflax_eqx.im2col_layers`][]: every
    [`bioflax_eqx.Im2colConv`][] and [`bioflax_eqx.BlockMaxPool`][] back to the
    Equinox layer it computes.

    **Arguments:**

    - `model`: any pytree.

    **Returns:**

    The same pytree with `lax.conv_general_dilated` and `lax.reduce_window`.
    """

    def restore(node: object) -> object:
        if isinstance(node, Im2colConv):
            return node.conv
        if isinstance(node, BlockMaxPool):
            return node.pool
        return node

    return jax.tree_util.tree_map(restore, model, is_leaf=_lowered)


def check_conv_path(conv_path: str) -> None:
    if conv_path not in CONV_PATHS:
        raise ValueError(
            f"unknown conv_path {conv_path!r}; expected one of {', '.join(CONV_PATHS)}."
        )


def choose_conv_path(
    model: PyTree, backend: str | None = None
) -> Literal["im2col", "xla"]:
    """How a training loop should compute `model`'s convolutions: `"im2col"` on
    CPU if `model` has an `eqx.nn.Conv` (XLA:CPU runs its own convolutions inside
    loop bodies through a slow path, jax-ml/jax#12868; slices and one `dot` are
    several times faster there, see `benchmarks/`), else `"xla"` (GPUs and TPUs run
    `lax.conv_general_dilated` through their convolution libraries, and a model
    without convolutions has nothing to change).

    **Arguments:**

    - `model`: any pytree.
    - `backend`: the platform the loop runs on (`"cpu"`, `"gpu"`, `"tpu"`, ...);
        `None` means `jax.default_backend()`.

    **Returns:**

    `"im2col"` or `"xla"`, for `conv_path=` of [`bioflax_eqx.train_epoch`][].
    """
    backend = jax.default_backend() if backend is None else backend
    has_conv = any(
        isinstance(node, eqx.nn.Conv)
        for node in jax.tree_util.tree_leaves(model, is_leaf=_lowerable)
    )
    return "im2col" if backend == "cpu" and has_conv else "xla"


def _identity(tree: PyTree) -> PyTree:
    return tree


def lowering(
    conv_path: str, model: PyTree, mesh: Mesh | None = None
) -> tuple[Callable[[PyTree], PyTree], Callable[[PyTree], PyTree]]:
    """`(lower, restore)` for `conv_path` (`"auto"` resolved by
    [`bioflax_eqx.choose_conv_path`][] for `model` on the mesh's platform, or
    the default backend without one): the pair [`bioflax_eqx.im2col_layers`][]
    and [`bioflax_eqx.xla_layers`][] for `"im2col"`, two identities for
    `"xla"`."""
    check_conv_path(conv_path)
    if conv_path == "auto":
        backend = None if mesh is None else mesh.devices.flat[0].platform
        conv_path = choose_conv_path(model, backend)
    if conv_path == "im2col":
        return im2col_layers, xla_layers
    return _identity, _identity
