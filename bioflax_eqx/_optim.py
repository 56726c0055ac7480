"""Optimiser masks, so that fixed feedback never moves and Kolen-Pollack's feedback
decays exactly like its weight.

```python
params = eqx.filter(model, eqx.is_inexact_array)
adamw = optax.adamw(1e-3, weight_decay=1e-4, mask=bfx.decay_mask)
optimizer = bfx.freeze_feedback(adamw)
opt_state = optimizer.init(params)
```
"""

import dataclasses

import equinox as eqx
import jax
import optax
from jaxtyping import PyTree

from ._linear import AbstractFeedbackModule


_NOT_FEEDBACK = ("weight", "bias")


def _label_module(module: AbstractFeedbackModule) -> PyTree[str]:
    labels = jax.tree_util.tree_map(lambda _: "trainable", module)
    if module.trains_feedback:
        return labels
    names = [
        f.name
        for f in dataclasses.fields(module)
        if f.name not in _NOT_FEEDBACK
        and not f.metadata.get("static", False)
        and getattr(labels, f.name) is not None
    ]
    for name in names:
        labels = eqx.tree_at(
            lambda m: getattr(m, name),
            labels,
            replace_fn=lambda sub: jax.tree_util.tree_map(lambda _: "fixed", sub),
        )
    return labels


def feedback_labels(model: PyTree) -> PyTree[str | None]:
    """Label every trainable array of a model.

    **Arguments:**

    - `model`: any pytree holding feedback layers: the model, its parameters
        (`eqx.filter(model, eqx.is_inexact_array)`) or gradients or updates.

    **Returns:**

    A pytree of the structure of `eqx.filter(model, eqx.is_inexact_array)`:
    `"fixed"` on feedback arrays that must never move (every rule but Kolen-Pollack),
    `"trainable"` on every other floating array, `None` elsewhere.
    """
    params = eqx.filter(model, eqx.is_inexact_array)
    return jax.tree_util.tree_map(
        lambda x: (
            _label_module(x) if isinstance(x, AbstractFeedbackModule) else "trainable"
        ),
        params,
        is_leaf=lambda x: isinstance(x, AbstractFeedbackModule),
    )


def freeze_feedback(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """Wrap an optimiser so that fixed feedback gets a zero update.

    A zero gradient is not enough: weight decay (AdamW, `add_decayed_weights`) would
    still shrink `B`. Kolen-Pollack's feedback is trainable and passes through.

    **Arguments:**

    - `optimizer`: any optax transformation, applied to every other array.

    **Returns:**

    An optax transformation for `eqx.filter(model, eqx.is_inexact_array)`.
    """
    return optax.multi_transform(
        {"trainable": optimizer, "fixed": optax.set_to_zero()}, feedback_labels
    )


def decay_mask(model: PyTree, *, include_bias: bool = False) -> PyTree[bool | None]:
    """Which arrays weight decay should act on.

    Weight matrices, and Kolen-Pollack's feedback with exactly the same decay, so that
    `W - Bᵀ` shrinks by `(1 - ηλ)` each step. Never fixed feedback.

    **Arguments:**

    - `model`: the model, or its parameters, gradients or updates.
    - `include_bias`: also decay vectors (biases).

    **Returns:**

    A boolean pytree of the structure of `eqx.filter(model, eqx.is_inexact_array)`.
    Pass the function itself as `mask=` of `optax.add_decayed_weights` or
    `optax.adamw` (optax calls it on the parameters); a model is callable, so optax
    would mistake a precomputed mask for a function.
    """
    params = eqx.filter(model, eqx.is_inexact_array)
    return jax.tree_util.tree_map(
        lambda label, x: label == "trainable" and (include_bias or x.ndim >= 2),
        feedback_labels(model),
        params,
    )
