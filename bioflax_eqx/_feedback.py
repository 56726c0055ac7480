"""The custom-VJP primitives shared by every rule.

Each rule changes only *which matrix carries the error back to a layer's input*. The
weight and bias gradients stay ordinary autodiff of `weight @ stop_gradient(x) + bias`,
so under `jax.vmap` they compile to the same single matrix product as backprop; the
custom backward passes below touch only input cotangents, which are per example anyway.
A custom backward that returned per-example `outer(g, x)` would make JAX build and sum
batch x out x in tensors instead.

Feedback matrices may arrive in either layout: `B` of shape (in, out), or `Bᵀ` of the
weight's shape (out, in). Sign-symmetric feedback is built elementwise from `W`, so it
is cheapest in `W`'s layout; a dot reads either layout at the same cost.
"""

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ._kernels import row_major


@eqx.filter_custom_vjp
def _reroute(vjp_arg, feedback, transposed):
    output, _ = vjp_arg
    return output


@_reroute.def_fwd
def _reroute_fwd(perturbed, vjp_arg, feedback, transposed):
    del perturbed, feedback, transposed
    output, _ = vjp_arg
    return output, None


@_reroute.def_bwd
def _reroute_bwd(residuals, grad_output, perturbed, vjp_arg, feedback, transposed):
    del residuals, vjp_arg
    _, input_perturbed = perturbed
    if grad_output is None or not input_perturbed:
        # No input cotangent when the input needs none (the data at the first layer).
        return grad_output, None
    grad_input = grad_output @ feedback if transposed else feedback @ grad_output
    return grad_output, grad_input


def reroute(
    output: Float[Array, " out"],
    input: Float[Array, " in"],
    feedback: Float[Array, "in out"] | Float[Array, "out in"],
    *,
    transposed: bool = False,
) -> Float[Array, " out"]:
    """Identity on `output`; on the backward pass, `input` receives `B g`.

    `feedback` is `B`, of shape (in, out), or with `transposed=True` it is `Bᵀ`, of
    the weight's shape (out, in). `g`, the cotangent of `output`, also flows on
    unchanged to `output`'s own inputs. The caller computes `output` from
    `stop_gradient(input)`, so the only cotangent that reaches `input` is this one.
    """
    return _reroute((output, input), lax.stop_gradient(feedback), transposed)


@eqx.filter_custom_vjp
def _tie(vjp_arg):
    weight, _ = vjp_arg
    return weight


@_tie.def_fwd
def _tie_fwd(perturbed, vjp_arg):
    del perturbed
    weight, _ = vjp_arg
    return weight, None


@_tie.def_bwd
def _tie_bwd(residuals, grad_weight, perturbed, vjp_arg):
    del residuals, vjp_arg
    weight_perturbed, feedback_perturbed = perturbed
    if grad_weight is None:
        return None, None
    # Written out once by the transpose kernel: left as a strided view, the
    # transpose would be fused into every consumer, e.g. Adam's moment updates, where
    # XLA:CPU runs it as slow strided scalar code.
    return (
        grad_weight if weight_perturbed else None,
        row_major(grad_weight.T) if feedback_perturbed else None,
    )


def tie(
    weight: Float[Array, "out in"], feedback: Float[Array, "in out"]
) -> Float[Array, "out in"]:
    """Identity on `weight`; on the backward pass `feedback` receives the transposed
    weight gradient (Kolen-Pollack's `dB = dW^T`).

    The weight is not batched under `jax.vmap`, so its cotangent arrives already summed
    over the batch (one matrix product) and the transpose costs out x in, not more.
    """
    return _tie((weight, feedback))


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
    grad_activation = feedback @ grad_error if activation_perturbed else None
    return grad_activation, grad_error


def direct_feedback(
    activation: Float[Array, " features"],
    channel: Float[Array, " error"],
    feedback: Float[Array, "features error"],
) -> tuple[Float[Array, " features"], Float[Array, " error"]]:
    """Identity on `(activation, channel)`; on the backward pass `activation` receives
    `feedback @ e`, where `e` is the channel's cotangent (the network's output error),
    and `e` passes on unchanged down the channel.
    """
    return _direct_feedback((activation, channel), lax.stop_gradient(feedback))


@eqx.filter_custom_vjp
def _close(vjp_arg):
    output, _ = vjp_arg
    return output


@_close.def_fwd
def _close_fwd(perturbed, vjp_arg):
    del perturbed
    output, _ = vjp_arg
    return output, None


@_close.def_bwd
def _close_bwd(residuals, grad_output, perturbed, vjp_arg):
    del residuals, vjp_arg
    output_perturbed, channel_perturbed = perturbed
    if grad_output is None:
        return None, None
    return (
        grad_output if output_perturbed else None,
        grad_output if channel_perturbed else None,
    )


def close(
    output: Float[Array, " error"], channel: Float[Array, " error"]
) -> Float[Array, " error"]:
    """Identity on `output`; its cotangent `e` is also sent down `channel`."""
    return _close((output, channel))


def open_channel(x: Array, error_features: int, dtype) -> Float[Array, " error"]:
    """A zero vector that depends on `x`, so that under `jax.vmap` it is batched like
    `x`. An unbatched channel would receive the batch *sum* of the errors."""
    zeros = jnp.zeros((error_features,), dtype)
    first = lax.stop_gradient(jnp.ravel(x)[:1]).astype(dtype)
    return lax.select(
        jnp.zeros((error_features,), bool), jnp.broadcast_to(first, zeros.shape), zeros
    )
