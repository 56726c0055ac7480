"""The custom-VJP primitives shared by every rule.

Each rule changes only *what carries the error back to a layer's input*. The weight
and bias gradients stay ordinary autodiff of `layer(stop_gradient(x))`, so under
`jax.vmap` they compile to the same single product over the batch as backprop; the
custom backward passes below touch only input cotangents, which are per example
anyway. A custom backward that returned per-example weight cotangents would make JAX
build and sum batch x out x in tensors instead.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Shaped


@eqx.filter_custom_vjp
def _reroute(vjp_arg, backward):
    output, _ = vjp_arg
    return output


@_reroute.def_fwd
def _reroute_fwd(perturbed, vjp_arg, backward):
    del perturbed, backward
    output, _ = vjp_arg
    return output, None


@_reroute.def_bwd
def _reroute_bwd(residuals, grad_output, perturbed, vjp_arg, backward):
    del residuals
    _, x = vjp_arg
    _, input_perturbed = perturbed
    if grad_output is None or not input_perturbed:
        # No input cotangent when the input needs none (the data at the first layer).
        return grad_output, None
    # The transpose of the layer's linear map with the feedback weights: `Bᵀ g` for a
    # dense layer, the transposed convolution with the feedback kernel for a conv.
    # The forward half of this `vjp` is unused and removed by the compiler.
    _, pullback = jax.vjp(backward, x)
    (grad_input,) = pullback(grad_output)
    return grad_output, grad_input


def reroute(
    output: Shaped[Array, "..."],
    input: Float[Array, "..."],
    backward: Callable[[Array], Array],
) -> Shaped[Array, "..."]:
    """Identity on `output`; on the backward pass, `input` receives
    `vjp(backward, input)(g)` for `g` the cotangent of `output`, which also flows on
    unchanged to `output`'s own inputs.

    `backward` is the wrapped layer with its weight replaced by the feedback weights
    (arrays held fixed). The caller computes `output` from `stop_gradient(input)`, so
    the only cotangent that reaches `input` is this one.
    """
    return _reroute((output, input), backward)


@eqx.filter_custom_vjp
def _share(vjp_arg):
    first, _ = vjp_arg
    return first


@_share.def_fwd
def _share_fwd(perturbed, vjp_arg):
    del perturbed
    first, _ = vjp_arg
    return first, None


@_share.def_bwd
def _share_bwd(residuals, grad_first, perturbed, vjp_arg):
    del residuals, vjp_arg
    first_perturbed, second_perturbed = perturbed
    if grad_first is None:
        return None, None
    return (
        grad_first if first_perturbed else None,
        grad_first if second_perturbed else None,
    )


def _shared(first: Array, second: Array) -> Array:
    """Identity on `first`; on the backward pass its cotangent also goes, as it is,
    to `second` (of the same shape)."""
    return _share((first, second))


def tie(
    weight: Float[Array, "*shape"], feedback: Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """Identity on `weight`; on the backward pass `feedback` receives the weight's own
    gradient (Kolen-Pollack). Both are stored in the weight's layout, so this is a
    copy, not a transpose; the weight is unbatched under `jax.vmap`, so its
    cotangent arrives already summed over the batch."""
    return _shared(weight, feedback)


@eqx.filter_custom_vjp
def _direct_feedback(vjp_arg, feedback):
    return vjp_arg


@_direct_feedback.def_fwd
def _direct_feedback_fwd(perturbed, vjp_arg, feedback):
    del perturbed, feedback
    return vjp_arg, None


@_direct_feedback.def_bwd
def _direct_feedback_bwd(residuals, grads, perturbed, vjp_arg, feedback):
    del residuals, vjp_arg
    # The cotangent arriving at the activation is discarded: DFA has no backward chain.
    _, grad_error = grads
    activation_perturbed, _ = perturbed
    if grad_error is None:
        return None, None
    if not activation_perturbed:
        grad_activation = None
    elif grad_error.ndim == 1:
        grad_activation = jnp.tensordot(feedback, grad_error, axes=1)
    else:
        # A per-token error `(*positions, error)`: `B e_t` at every position, one
        # product `e Bᵀ` with `B` shared across positions.
        axes = ((grad_error.ndim - 1,), (feedback.ndim - 1,))
        grad_activation = jnp.tensordot(grad_error, feedback, axes=axes)
    return grad_activation, grad_error


def direct_feedback(
    activation: Float[Array, "..."],
    channel: Float[Array, "*positions error"],
    feedback: Float[Array, "*shape error"],
) -> tuple[Float[Array, "..."], Float[Array, "*positions error"]]:
    """Identity on `(activation, channel)`; on the backward pass `e`, the channel's
    cotangent (the network's output error), passes on unchanged down the channel and
    `activation`, of shape `(*positions, *shape)`, receives `B e_p` at each position
    `p` (contracting the error axis): `tensordot(feedback, e, 1)` for a per-example
    error (no positions), `e @ feedback.T` for a per-token error of a sequence.
    """
    return _direct_feedback((activation, channel), lax.stop_gradient(feedback))


def close(
    output: Float[Array, "*error_shape"], channel: Float[Array, "*error_shape"]
) -> Float[Array, "*error_shape"]:
    """Identity on `output`; its cotangent `e` is also sent down `channel`."""
    return _shared(output, channel)


def open_channel(
    x: Array, error_shape: tuple[int, ...], dtype
) -> Float[Array, "*error_shape"]:
    """Zeros of `error_shape` that depend on `x`, so that under `jax.vmap` they are
    batched like `x`. An unbatched channel would receive the batch *sum* of the
    errors."""
    zeros = jnp.zeros(error_shape, dtype)
    first = lax.stop_gradient(jnp.ravel(x)[:1]).astype(dtype)
    return lax.select(
        jnp.zeros(error_shape, bool), jnp.broadcast_to(first, error_shape), zeros
    )
