"""The weight mirror's second phase: every WM layer of a model learns `B` from its
own noise, between learning steps."""

import jax
from jaxtyping import PRNGKeyArray, PyTree

from ._checks import (
    check_non_negative_number,
    check_positive_int,
    check_positive_number,
)
from ._rules import WM


def mirror(
    model: PyTree,
    key: PRNGKeyArray,
    *,
    lr: float = 0.005,
    noise_std: float = 1.0,
    decay: float = 1.0,
    batch_size: int = 256,
) -> PyTree:
    """One mirror step of every [`bioflax_eqx.WM`][] layer in a model.

    Each layer, independently of the data and of the others, draws `batch_size`
    noise inputs $x_n \\sim \\mathcal N(0, \\sigma^2 I)$, computes $y_n = W x_n$ and
    updates

    $$B \\leftarrow (1 - \\eta_B \\lambda_B) B + \\frac{\\eta_B}{N} \\sum_n y_n
    x_n^\\top .$$

    The weight is read as a matrix of shape `(out, fan_in)`; for a convolution that
    is the layer's operator applied to a noise patch the size of its receptive field
    (one output position, no padding), so $\\mathbb E[y x^\\top] = \\sigma^2 W$ holds
    for kernels too. The fixed point is $B = \\sigma^2 W / \\lambda_B$: with the
    defaults, `B` tracks `W` itself.

    **Arguments:**

    - `model`: any model holding WM layers (others are left as they are); one
        without any is refused with a `ValueError`.
    - `key`: the noise; a fresh key per call.
    - `lr`: the mirror learning rate $\\eta_B$.
    - `noise_std`: the noise scale $\\sigma$.
    - `decay`: the weight decay $\\lambda_B$ of `B`.
    - `batch_size`: the number $N$ of noise inputs per layer and step.

    **Returns:**

    The model with every WM layer's `feedback` updated; nothing else changes.
    """
    check_positive_number(lr=lr, noise_std=noise_std)
    check_non_negative_number(decay=decay)
    check_positive_int(batch_size=batch_size)
    is_wm = lambda x: isinstance(x, WM)  # noqa: E731
    count = sum(is_wm(x) for x in jax.tree_util.tree_leaves(model, is_leaf=is_wm))
    if count == 0:
        # Most likely the wrong model or half of one: a silent no-op hides that.
        raise ValueError(
            f"mirror found no `bfx.WM` layer in the {type(model).__name__} passed; "
            "build it with rule='wm' (or `bfx.convert(model, 'wm', key=...)`)."
        )
    keys = iter(jax.random.split(key, count))
    return jax.tree_util.tree_map(
        lambda x: (
            x.mirrored(
                next(keys),
                lr=lr,
                noise_std=noise_std,
                decay=decay,
                batch_size=batch_size,
            )
            if is_wm(x)
            else x
        ),
        model,
        is_leaf=is_wm,
    )
