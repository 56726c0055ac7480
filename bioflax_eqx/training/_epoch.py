"""One training epoch as one compiled call: shuffle, then a `lax.scan` of optimiser
steps. The trainer ([`bioflax_eqx.train`][]) runs its epochs with it, and so can any
other loop (the benchmarks do).
[`train_epoch_with_state`][bioflax_eqx.train_epoch_with_state] carries an
`eqx.nn.State` (batch norm) through the scan too."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optax
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Shaped

from .._data import epoch_batches


@eqx.filter_jit
def train_epoch(
    params: PyTree,
    static: PyTree,
    opt_state: PyTree,
    x: Shaped[Array, " n *xdims"],
    y: Shaped[Array, " n *ydims"],
    key: PRNGKeyArray,
    *,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[[PyTree, Array, Array, PRNGKeyArray], tuple[Array, Any]],
    batch_size: int,
    after_step: Callable[[PyTree, PRNGKeyArray], PyTree] | None = None,
) -> tuple[PyTree, PyTree, Float[Array, " steps"], PyTree]:
    """One epoch of training: shuffles `(x, y)` on device
    ([`bioflax_eqx.epoch_batches`][]), then runs one optimiser step per minibatch in
    a single `lax.scan`, all in one compiled call.

    ```python
    params, static = eqx.partition(model, bfx.trainable(model))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def loss_fn(model, x, y, key):
        logits = jax.vmap(lambda xi: model(xi, key=key))(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, None

    for epoch_key in jax.random.split(key, epochs):
        params, opt_state, losses, _ = bfx.train_epoch(
            params, static, opt_state, x, y, epoch_key,
            optimizer=optimizer, loss_fn=loss_fn, batch_size=128,
        )
    ```

    Compiled with `eqx.filter_jit`: the arrays of every argument are traced (the
    fixed feedback in `static` too, so it is not baked into the program), and
    `optimizer`, `loss_fn` and `batch_size` are static. Pass the same `optimizer`
    and `loss_fn` objects on every call, or each call compiles anew. Also traces
    inside a caller's `jit`.

    **Arguments:**

    - `params`: the trained half of the model, e.g. from
        `eqx.partition(model, bfx.trainable(model))`.
    - `static`: the other half (fixed feedback, activation functions, ...).
    - `opt_state`: `optimizer`'s state for `params`.
    - `x`, `y`: the training inputs and targets, first axis = examples. The last
        `n % batch_size` examples of each shuffled order are dropped.
    - `key`: decides the order, and the key of each step (split from it).
    - `optimizer`: the optax transformation, applied to `params` each step.
    - `loss_fn`: `loss_fn(model, xb, yb, key) -> (loss, aux)`, with `model =
        eqx.combine(params, static)`, a minibatch `(xb, yb)` and a key of its own
        per step (brSF draws its feedback from it); `loss` is the scalar that is
        differentiated, `aux` any pytree of arrays (or `None`) to return per step.
    - `batch_size`: examples per step.
    - `after_step`: a pure function `(model, key) -> model` run after every
        optimiser step with a key of its own, e.g. the weight mirror's
        [`bioflax_eqx.mirror`][] (with its settings bound by `functools.partial`).
        It may change the arrays of `params` only (so a WM model's feedback must
        be in `params`, its optimiser update zeroed by
        [`bioflax_eqx.freeze_feedback`][]).

    **Returns:**

    `(params, opt_state, losses, aux)`: the parameters and optimiser state after
    the epoch, the loss of each step (shape `(steps,)`, computed before that step's
    update) and each step's `aux`, stacked along a new first axis.
    """

    def stateful_loss_fn(model, state, xb, yb, key):
        loss, aux = loss_fn(model, xb, yb, key)
        return loss, (aux, state)

    params, _, opt_state, losses, aux = _epoch(
        params,
        static,
        None,
        opt_state,
        x,
        y,
        key,
        optimizer=optimizer,
        loss_fn=stateful_loss_fn,
        batch_size=batch_size,
        after_step=after_step,
    )
    return params, opt_state, losses, aux


@eqx.filter_jit
def train_epoch_with_state(
    params: PyTree,
    static: PyTree,
    state: PyTree,
    opt_state: PyTree,
    x: Shaped[Array, " n *xdims"],
    y: Shaped[Array, " n *ydims"],
    key: PRNGKeyArray,
    *,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[
        [PyTree, PyTree, Array, Array, PRNGKeyArray], tuple[Array, tuple[Any, PyTree]]
    ],
    batch_size: int,
    after_step: Callable[[PyTree, PRNGKeyArray], PyTree] | None = None,
) -> tuple[PyTree, PyTree, PyTree, Float[Array, " steps"], PyTree]:
    """[`bioflax_eqx.train_epoch`][] for models with state that is not trained but
    updated by every step, e.g. the running statistics of `eqx.nn.BatchNorm` in an
    `eqx.nn.State`: the state is carried through the epoch's scan beside the
    parameters.

    ```python
    model, state = eqx.nn.make_with_state(MyNet)(key=key)  # batch norm over "batch"
    params, static = eqx.partition(model, bfx.trainable(model))

    def loss_fn(model, state, x, y, key):
        batched = jax.vmap(
            lambda xi, s: model(xi, s, key=key),
            axis_name="batch", in_axes=(0, None), out_axes=(0, None),
        )
        logits, state = batched(x, state)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (None, state)

    params, state, opt_state, losses, _ = bfx.train_epoch_with_state(
        params, static, state, opt_state, x, y, key,
        optimizer=optimizer, loss_fn=loss_fn, batch_size=128,
    )
    ```

    **Arguments:**

    As for [`bioflax_eqx.train_epoch`][], plus

    - `state`: any pytree of arrays (an `eqx.nn.State`), not differentiated.
    - `loss_fn`: `loss_fn(model, state, xb, yb, key) -> (loss, (aux, state))`: the
        loss, the step's auxiliary output and the updated state.

    **Returns:**

    `(params, state, opt_state, losses, aux)`: as for
    [`bioflax_eqx.train_epoch`][], with the state after the last step.
    """
    return _epoch(
        params,
        static,
        state,
        opt_state,
        x,
        y,
        key,
        optimizer=optimizer,
        loss_fn=loss_fn,
        batch_size=batch_size,
        after_step=after_step,
    )


def _epoch(
    params,
    static,
    state,
    opt_state,
    x,
    y,
    key,
    *,
    optimizer,
    loss_fn,
    batch_size,
    after_step,
):
    def step(carry, batch):
        params, state, opt_state = carry
        xb, yb, step_key = batch

        def loss(params):
            return loss_fn(eqx.combine(params, static), state, xb, yb, step_key)

        (value, (aux, state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = eqx.apply_updates(params, updates)
        if after_step is not None:
            model = after_step(
                eqx.combine(params, static), jax.random.fold_in(step_key, 1)
            )
            # Back to the same split: the arrays that were in `params`.
            params = jax.tree_util.tree_map(
                lambda p, m: None if p is None else m,
                params,
                eqx.filter(model, eqx.is_array),
                is_leaf=lambda p: p is None,
            )
        return (params, state, opt_state), (value, aux)

    shuffle_key, step_key = jax.random.split(key)
    xb, yb = epoch_batches(shuffle_key, x, y, batch_size)
    keys = jax.random.split(step_key, xb.shape[0])
    (params, state, opt_state), (losses, aux) = lax.scan(
        step, (params, state, opt_state), (xb, yb, keys)
    )
    return params, state, opt_state, losses, aux
