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

from ._rules import KP, AbstractFeedback


# The wrapped layer trains as usual; every other array field of a rule is feedback.
_NOT_FEEDBACK = ("layer",)


def _label_module(module: AbstractFeedback) -> PyTree[str]:
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
        lambda x: _label_module(x) if isinstance(x, AbstractFeedback) else "trainable",
        params,
        is_leaf=lambda x: isinstance(x, AbstractFeedback),
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


def tie_feedback(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """Wrap an optimiser so that each Kolen-Pollack layer's `feedback` receives its
    weight's update instead of being optimised on its own.

    Kolen-Pollack gives `B` the weight's gradient, so an optimiser whose update of an
    array depends only on that array's gradients (Adam, SGD, momentum, RMSProp, ...,
    without weight decay) computes the same update for `B` as for `W`, from a second
    copy of the same state. This wrapper computes it once: `B` gets no optimiser state
    and no arithmetic of its own, and the result is the same, step for step.

    It is *not* the same with weight decay (it reads the array's value, which differs
    between `W` and `B`: with it, pass `optimizer` itself, masked by
    [`bioflax_eqx.decay_mask`][], and `W - B` shrinks by `(1 - ηλ)` per SGD step), nor
    with transformations that mix arrays, such as global-norm clipping.

    **Arguments:**

    - `optimizer`: any optax transformation, applied to every array but
        Kolen-Pollack's feedback.

    **Returns:**

    An optax transformation for `eqx.partition(model, bfx.trainable(model))[0]` (or
    `eqx.filter(model, eqx.is_inexact_array)` of a model whose only feedback is
    Kolen-Pollack's).
    """
    is_kp = lambda x: isinstance(x, KP)  # noqa: E731

    def labels(params: PyTree) -> PyTree[str]:
        def label(x):
            labels = jax.tree_util.tree_map(lambda _: "own", x)
            if is_kp(x):
                labels = eqx.tree_at(lambda m: m.feedback, labels, "tied")
            return labels

        return jax.tree_util.tree_map(label, params, is_leaf=is_kp)

    inner = optax.multi_transform(
        {"own": optimizer, "tied": optax.set_to_zero()}, labels
    )

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, params)
        updates = jax.tree_util.tree_map(
            lambda x: eqx.tree_at(lambda m: m.feedback, x, x.weight) if is_kp(x) else x,
            updates,
            is_leaf=is_kp,
        )
        return updates, state

    return optax.GradientTransformation(inner.init, update)


def decay_mask(model: PyTree, *, include_bias: bool = False) -> PyTree[bool | None]:
    """Which arrays weight decay should act on.

    Weight matrices and kernels, and Kolen-Pollack's feedback with exactly the same
    decay, so that `W - B` (both in the weight's layout) shrinks by `(1 - ηλ)` each
    step. Never fixed feedback. Biases (fields named `bias`, such as a conv's of
    shape `(out, 1, 1)`) and other vectors only with `include_bias`.

    **Arguments:**

    - `model`: the model, or its parameters, gradients or updates.
    - `include_bias`: also decay biases and other vectors.

    **Returns:**

    A boolean pytree of the structure of `eqx.filter(model, eqx.is_inexact_array)`.
    Pass the function itself as `mask=` of `optax.add_decayed_weights` or
    `optax.adamw` (optax calls it on the parameters); a model is callable, so optax
    would mistake a precomputed mask for a function.
    """
    params = eqx.filter(model, eqx.is_inexact_array)

    def is_bias(path, x) -> bool:
        name = getattr(path[-1], "name", None) if path else None
        return x.ndim < 2 or name == "bias"

    return jax.tree_util.tree_map(
        lambda label, x: label == "trainable" and (include_bias or not x),
        feedback_labels(model),
        jax.tree_util.tree_map_with_path(is_bias, params),
    )


def trainable(model: PyTree) -> PyTree[bool]:
    """A filter spec for `eqx.partition` that leaves fixed feedback out of the
    trained half.

    ```python
    params, static = eqx.partition(model, bfx.trainable(model))
    optimizer = optax.adamw(1e-3, weight_decay=1e-4, mask=bfx.decay_mask)
    opt_state = optimizer.init(params)  # no optimiser state for fixed feedback

    @eqx.filter_jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss)(params, static, x, y)  # no gradient of fixed B either
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state
    ```

    This is the cheap and correct path: the optimiser never sees FA's, DFA's or
    frSF's feedback, so it neither spends work on it nor decays it. (Filtering with
    `eqx.is_inexact_array` alone hands fixed feedback to the optimiser; then wrap it
    in [`bioflax_eqx.freeze_feedback`][].)

    **Arguments:**

    - `model`: any model.

    **Returns:**

    A pytree of bools of `model`'s structure: `True` on weights, biases, every other
    floating array and Kolen-Pollack's feedback; `False` on fixed feedback and on
    everything that is not a floating array.
    """
    return jax.tree_util.tree_map(
        lambda label: label == "trainable",
        feedback_labels(model),
        is_leaf=lambda x: x is None,
    )
