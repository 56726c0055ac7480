"""The rules as wrappers: each wraps any Equinox layer that is linear in its input.

For a layer `y = op(W, x) + b`, backprop sends `vjp_x op(W, ·)(g)` to the input. Every
rule here keeps the forward pass and the weight and bias gradients of backprop and
changes only that input cotangent, to `vjp_x op(B, ·)(g)`: the *same operator* with the
feedback weights `B` in place of `W`, computed from the wrapped layer itself (its weight
swapped for `B`). So a new rule is one class, and a new layer type is none.

`B` is always stored in the weight's layout (`feedback.shape == weight.shape`); for a
dense layer the papers' `B` (shape of `Wᵀ`) is `feedback.T`.
"""

import abc
import math
from typing import ClassVar, Generic, TypeVar

import equinox as eqx
import jax
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._checks import (
    check_feedback,
    check_layer,
    check_linear,
    check_linear_input,
    check_positive_number,
    check_wrappable,
    example_input,
)
from ._feedback import reroute, tie
from ._misc import uniform


# The wrapped layer's type, as in `eqx.nn.WeightNorm`: any block for DFA, a layer
# linear in its input for a rule.
_Wrapped = TypeVar("_Wrapped")
_Layer = TypeVar("_Layer", bound=eqx.Module)


def fan_in(weight: Array) -> int:
    """The fan-in of a weight stored output-first, as Equinox's `Linear` and `Conv*`
    store theirs: every axis but the first."""
    return max(math.prod(weight.shape[1:]), 1)


def fixed(tree: PyTree) -> PyTree:
    """`tree` with `stop_gradient` on every array."""
    arrays, rest = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree_util.tree_map(lax.stop_gradient, arrays), rest)


def with_weight(layer: eqx.Module, weight: Array) -> eqx.Module:
    return eqx.tree_at(lambda m: m.weight, layer, weight)


class AbstractFeedback(eqx.Module):
    """Anything holding feedback weights. `trains_feedback` says whether its feedback
    arrays receive gradients (Kolen-Pollack) or must never move (every other rule);
    [`bioflax_eqx.feedback_labels`][] reads it to build optimiser masks.

    Every field but `layer` (the wrapped layer, trained as usual) holds feedback.
    """

    trains_feedback: eqx.AbstractClassVar[bool]


class AbstractWrapper(AbstractFeedback, Generic[_Wrapped]):
    """Feedback around a wrapped layer or block, `layer`, whose type it carries
    (`FA[eqx.nn.Linear]`), as `eqx.nn.WeightNorm` does."""

    layer: eqx.AbstractVar[_Wrapped]

    @property
    def weight(self) -> Float[Array, "..."]:
        """The wrapped layer's weight."""
        return self.layer.weight  # pyright: ignore[reportAttributeAccessIssue]

    @property
    def bias(self) -> Float[Array, "..."] | None:
        """The wrapped layer's bias, or `None`."""
        return getattr(self.layer, "bias", None)


class AbstractRule(AbstractWrapper[_Layer]):
    """A layer `y = op(W, x) + b`, linear in its input, whose backward pass sends the
    error to its input through feedback weights `B` instead of `W`.

    With `g = ∂L/∂y` the cotangent at the layer's output, every rule computes

    - the weight and bias gradients of backprop (ordinary autodiff of the wrapped
        layer: `g xᵀ` and `g` for a dense layer, one product over the batch);
    - the input cotangent `vjp_x op(B, ·)(g)` where backprop would use
        `vjp_x op(W, ·)(g)`: `Bᵀ g` for a dense layer with `B` stored like `W`, the
        transposed convolution with the kernel `B` for a convolution.

    The rules differ only in `B` and in whether `B` learns. `layer` is any Equinox
    module with a `weight` that is linear in its input (`eqx.nn.Linear`,
    `eqx.nn.Conv*`, `eqx.nn.ConvTranspose*`, or one of your own). Layers act on one
    example; batch with `jax.vmap`.
    """

    layer: eqx.AbstractVar[_Layer]
    # `B` in the weight's layout: a field, or for sign symmetry a property derived
    # from `W` (brSF: its expected value).
    feedback: eqx.AbstractVar[Float[Array, "..."]]

    @abc.abstractmethod
    def feedback_weight(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "..."]:
        """The feedback weights that carry the error to this layer's input on this
        call.

        **Arguments:**

        - `key`: only for rules that draw random feedback on every call (brSF).

        **Returns:**

        `B`, of the shape of the wrapped layer's `weight`.
        """

    def __call__(
        self, x: Float[Array, "..."], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "..."]:
        """**Arguments:**

        - `x`: one example, as the wrapped layer takes it.
        - `key`: randomness for rules that draw feedback on every call (brSF); ignored
            otherwise. Under `jax.vmap`, pass the same key to every example
            (`in_axes=None`) so the whole batch shares one draw.

        **Returns:**

        The wrapped layer's output, unchanged.
        """
        name = type(self).__name__
        check_linear_input(self.layer, x, name)
        if example_input(self.layer) is None:
            # A layer of your own: its input shape is known only now.
            check_linear(self.layer, jax.ShapeDtypeStruct(x.shape, x.dtype), name)
        # The rule's name in the HLO and in profiles, as `eqx.nn.WeightNorm` does.
        with jax.named_scope(f"bfx.{name}"):
            feedback = self.feedback_weight(key=key)
            # Also catches feedback replaced by tree surgery (no __check_init__).
            check_feedback("feedback", feedback, self.weight)
            layer = self.layer
            if self.trains_feedback:
                layer = with_weight(layer, tie(self.weight, self.feedback))
            output = layer(lax.stop_gradient(x))  # pyright: ignore[reportCallIssue]
            return reroute(output, x, fixed(with_weight(self.layer, feedback)))


def draw(layer: eqx.Module, name: str, scale: float, key: PRNGKeyArray) -> Array:
    """Checks `layer`, then draws from `U(-s/√fan_in, s/√fan_in)`: the distribution
    of Equinox's default initialisation of its weight, times `s = feedback_scale`."""
    check_wrappable(layer, name)
    check_positive_number(feedback_scale=scale)
    weight = layer.weight  # pyright: ignore[reportAttributeAccessIssue]
    return uniform(key, weight.shape, scale / math.sqrt(fan_in(weight)), weight.dtype)


def check_drawn(rule: AbstractRule, field: str) -> None:
    name = type(rule).__name__
    check_layer(rule.layer, name)
    check_feedback(field, getattr(rule, field), rule.weight)


class AbstractStoredRule(AbstractRule[_Layer]):
    """A rule whose feedback `B` is an array of its own, drawn at construction like
    the weight and then fixed (FA), trained (KP) or mirrored (WM)."""

    layer: _Layer
    feedback: Float[Array, "..."]

    def __init__(
        self, layer: _Layer, *, feedback_scale: float = 1.0, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `layer`: the layer to wrap, e.g. `eqx.nn.Linear` or `eqx.nn.Conv2d`.
        - `feedback_scale`: `B` is drawn from `U(-s/√fan_in, s/√fan_in)` with
            `s = feedback_scale` (an independent draw from Equinox's initialisation
            of the weight, `fan_in` = the size of every weight axis but the first).
        - `key`: a `jax.random.PRNGKey` for `B`.
        """
        self.feedback = draw(layer, type(self).__name__, feedback_scale, key)
        self.layer = layer

    def __check_init__(self):
        check_drawn(self, "feedback")

    def feedback_weight(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "..."]:
        return self.feedback


class FA(AbstractStoredRule[_Layer]):
    """Feedback Alignment (Lillicrap et al. 2016).

    The error reaches the layer's input through fixed random weights:

    $$\\bar x = B^\\top g, \\qquad \\Delta W \\propto g x^\\top, \\qquad \\Delta B =
    0$$

    for a dense layer with `B` stored like `W` (the papers' feedback matrix is
    `feedback.T`), so in a network $\\delta_l = \\phi'(a_l) \\odot B_{l+1}^\\top
    \\delta_{l+1}$; for a convolution the error goes back through the transposed
    convolution with kernel `B`. `feedback` receives a zero gradient; mask it out of
    the optimiser (see [`bioflax_eqx.freeze_feedback`][]) so that weight decay never
    moves it.
    """

    # The base's own: a type checker would otherwise synthesise a dataclass one.
    __init__ = AbstractStoredRule.__init__
    trains_feedback: ClassVar[bool] = False


class KP(AbstractStoredRule[_Layer]):
    """Kolen-Pollack (Kolen & Pollack 1994; Akrout et al. 2019).

    As Feedback Alignment, but `B` receives the weight's own update:

    $$\\bar x = B^\\top g, \\qquad \\Delta W \\propto g x^\\top, \\qquad
    \\Delta B = \\Delta W$$

    (`B` is stored like `W`; in the papers' layout, $\\Delta B = \\Delta W^\\top$).
    With the same weight decay $\\lambda$ on $W$ and $B$ and learning rate $\\eta$,
    $W_t - B_t = (1 - \\eta\\lambda)^t (W_0 - B_0)$ under SGD, and the same holds for
    decoupled decay with any elementwise optimiser (AdamW). Use
    [`bioflax_eqx.decay_mask`][], which includes `feedback` for this layer.
    """

    # The base's own: a type checker would otherwise synthesise a dataclass one.
    __init__ = AbstractStoredRule.__init__
    trains_feedback: ClassVar[bool] = True


class WM(AbstractStoredRule[_Layer]):
    """Weight mirror (Akrout, Wilson, Humphreys, Lillicrap & Tweed 2019).

    The learning phase is Feedback Alignment's with the current `B`:

    $$\\bar x = B^\\top g, \\qquad \\Delta W \\propto g x^\\top, \\qquad
    \\Delta B_{\\text{loss}} = 0,$$

    and between learning steps a mirror phase ([`bioflax_eqx.mirror`][]) drives the
    layer with its own noise, $x \\sim \\mathcal N(0, \\sigma^2 I)$, $y = W x$ (the
    linear part), and moves `B` towards the correlation of the two:

    $$B \\leftarrow (1 - \\eta_B \\lambda_B) B + \\eta_B \\, \\overline{y x^\\top}$$

    in the weight's layout (the papers' $\\Delta B \\propto x y^\\top$ for $B$ of the
    shape of $W^\\top$). Since $\\mathbb E[y x^\\top] = \\sigma^2 W$, `B` tracks
    $\\sigma^2 W / \\lambda_B$ and $\\angle(W, B)$ falls towards 0. `feedback`
    receives no gradient from the loss: mask it out of the optimiser like FA's.
    """

    # The base's own: a type checker would otherwise synthesise a dataclass one.
    __init__ = AbstractStoredRule.__init__
    trains_feedback: ClassVar[bool] = False

    def mirrored(
        self,
        key: PRNGKeyArray,
        *,
        lr: float,
        noise_std: float,
        decay: float,
        batch_size: int,
    ) -> "WM":
        """This layer after one mirror step (see [`bioflax_eqx.mirror`][])."""
        weight = lax.stop_gradient(self.weight)
        matrix = weight.reshape(weight.shape[0], -1)
        noise = noise_std * jax.random.normal(
            key, (batch_size, matrix.shape[1]), weight.dtype
        )
        response = noise @ matrix.T
        correlation = (response.T @ noise) / batch_size
        feedback = (1 - lr * decay) * self.feedback + lr * correlation.reshape(
            weight.shape
        )
        return eqx.tree_at(lambda m: m.feedback, self, feedback.astype(weight.dtype))
