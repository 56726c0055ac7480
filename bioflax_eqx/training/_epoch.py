"""One training epoch as one compiled call: shuffle, then a `lax.scan` of optimiser
steps. The trainer ([`bioflax_eqx.train`][]) runs its epochs with it, and so can any
other loop (the benchmarks do).
[`train_epoch_with_state`][bioflax_eqx.train_epoch_with_state] carries an
`eqx.nn.State` (batch norm) through the scan too. Given a `jax.sharding.Mesh`, both
run data-parallel on it (see the Many devices page)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Shaped

from .._lowering import ConvPath, lowering
from ..data import epoch_batches
from ._config import check_batch_split


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
    mesh: Mesh | None = None,
    conv_path: ConvPath = "auto",
    shuffle: bool = True,
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
    - `mesh`: run the epoch data-parallel over this `jax.sharding.Mesh`: each
        minibatch is split along its first axis over all the mesh's axes (so
        `batch_size` must be a multiple of `mesh.size`), while `params` and
        `opt_state` (and [`bioflax_eqx.train_epoch_with_state`][]'s `state`) stay
        replicated on every device; XLA sums the gradients across devices. Put
        the arrays on the mesh first, e.g. `jax.device_put(x, NamedSharding(mesh,
        PartitionSpec()))` (the data too: every device holds the whole data set
        and takes its part of each shuffled minibatch). The rules are unchanged:
        the result equals the single-device one up to the order of the sums.
        `None` (default): no sharding constraints.
    - `conv_path`: how the model's `eqx.nn.Conv` layers are computed inside the
        epoch: `"im2col"` (slices and one `dot`, [`bioflax_eqx.Im2colConv`][]),
        `"xla"` (`lax.conv_general_dilated`, as the layers do), or `"auto"`
        (default): [`bioflax_eqx.choose_conv_path`][], i.e. `"im2col"` on CPU
        for a model with convolutions, where XLA's own convolutions are several
        times slower inside the epoch's loop, `"xla"` elsewhere. Either way the
        same function and gradients (up to the order of float sums); the model
        you pass and get back keeps its `eqx.nn.Conv` layers.
    - `shuffle`: `False` takes the examples in their own order every epoch (the
        key still gives each step its key), as some published protocols do.

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
        mesh=mesh,
        conv_path=conv_path,
        shuffle=shuffle,
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
    mesh: Mesh | None = None,
    conv_path: ConvPath = "auto",
    shuffle: bool = True,
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
        mesh=mesh,
        conv_path=conv_path,
        shuffle=shuffle,
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
    mesh,
    conv_path,
    shuffle,
):
    split, replicate = _constraints(mesh, batch_size)
    # The same arrays in the same order either way, so the gradients with respect
    # to the lowered model's arrays are the parameters' own.
    lower, restore = lowering(conv_path, eqx.combine(params, static), mesh)

    def step(carry, batch):
        params, state, opt_state = carry
        xb, yb, step_key = batch
        xb, yb = split(xb, 0), split(yb, 0)

        def loss(params):
            model = lower(eqx.combine(params, static))
            return loss_fn(model, state, xb, yb, step_key)

        (value, (aux, state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = eqx.apply_updates(params, updates)
        if after_step is not None:
            model = after_step(
                lower(eqx.combine(params, static)), jax.random.fold_in(step_key, 1)
            )
            model = restore(model)
            # Back to the same split: the arrays that were in `params`.
            params = jax.tree_util.tree_map(
                lambda p, m: None if p is None else m,
                params,
                eqx.filter(model, eqx.is_array),
                is_leaf=lambda p: p is None,
            )
        # Kept replicated through the scan: XLA then sums the gradients of the
        # devices' parts of the batch (one all-reduce per step).
        return replicate((params, state, opt_state)), (value, aux)

    shuffle_key, step_key = jax.random.split(key)
    xb, yb = epoch_batches(shuffle_key if shuffle else None, x, y, batch_size)
    # The shuffled epoch split along the batch axis too: each device gathers only
    # its part of every minibatch from its copy of the data.
    xb, yb = split(xb, 1), split(yb, 1)
    keys = jax.random.split(step_key, xb.shape[0])
    params, state, opt_state = replicate((params, state, opt_state))
    (params, state, opt_state), (losses, aux) = lax.scan(
        step, (params, state, opt_state), (xb, yb, keys)
    )
    return params, state, opt_state, losses, aux


def _constraints(mesh: Mesh | None, batch_size: int):
    """`(split, replicate)`: `split(x, axis)` constrains `x` to be divided along
    `axis` over all the mesh's axes, `replicate(tree)` its arrays to be whole on
    every device; without a mesh, both leave their input as it is."""
    if mesh is None:
        return (lambda x, axis: x), (lambda tree: tree)
    check_batch_split(batch_size, mesh.size, f"the mesh's {mesh.size} devices")
    replicated = NamedSharding(mesh, P())

    def split(x, axis):
        spec = P(*[None] * axis, mesh.axis_names)
        return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def replicate(tree):
        return jax.tree_util.tree_map(
            lambda x: (
                lax.with_sharding_constraint(x, replicated) if eqx.is_array(x) else x
            ),
            tree,
        )

    return split, replicate
