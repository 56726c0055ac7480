"""Sign symmetry: rules whose feedback `B` follows the signs of the current weight
`W`, with a fixed scale (uSF), fixed random magnitudes (frSF) or magnitudes drawn
anew on every call (brSF)."""

import math
from typing import ClassVar, TypeVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_feedback, check_layer, check_positive_number, check_wrappable
from ._kernels import uniform as fused_uniform
from ._rules import AbstractRule, check_drawn, draw, fan_in


_Layer = TypeVar("_Layer", bound=eqx.Module)


class AbstractScaledSignRule(AbstractRule[_Layer]):
    """A sign-concordant rule with nothing stored: `B` follows `sign(W)` on every
    call, times a fixed `scale = feedback_scale / √(fan_in_factor · fan_in)`."""

    layer: _Layer
    scale: float = eqx.field(static=True)
    # The default scale's variance factor: 3 for the std of Equinox's initial
    # weights (uSF), 1 for their bound (brSF).
    fan_in_factor: eqx.AbstractClassVar[int]

    def __init__(
        self,
        layer: _Layer,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray | None = None,
    ):
        """**Arguments:**

        - `layer`: the layer to wrap.
        - `feedback_scale`: multiplies the default scale.
        - `key`: unused (nothing is drawn here); accepted so that every rule is
            built alike.
        """
        del key
        check_wrappable(layer, type(self).__name__)
        check_positive_number(feedback_scale=feedback_scale)
        self.layer = layer
        self.scale = feedback_scale / math.sqrt(
            self.fan_in_factor * fan_in(self.weight)
        )

    def __check_init__(self):
        check_layer(self.layer, type(self).__name__)
        check_positive_number(scale=self.scale)


class USF(AbstractScaledSignRule[_Layer]):
    """Uniform sign-concordant feedback, uSF (Liao, Leibo & Poggio 2016; named as in
    Sanfiz & Akrout 2021).

    $$B = s \\, \\operatorname{sign}(W),$$

    recomputed from the current $W$ on every call, with a fixed scale $s$ (the papers'
    $B$, shape of $W^\\top$, is its transpose for a dense layer). The default $s$ is
    the standard deviation of Equinox's initial weights, $1/\\sqrt{3 \\cdot
    \\mathrm{fan\\_in}}$, times `feedback_scale`. Nothing in $B$ is learned or stored.
    """

    # The base's own: a type checker would otherwise synthesise a dataclass one.
    __init__ = AbstractScaledSignRule.__init__
    trains_feedback: ClassVar[bool] = False
    fan_in_factor: ClassVar[int] = 3

    @property
    def feedback(self) -> Float[Array, "..."]:
        return self.scale * jnp.sign(self.weight)

    def feedback_weight(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "..."]:
        return self.feedback


class FRSF(AbstractRule[_Layer]):
    """Fixed random-magnitude sign-concordant feedback, frSF (Sanfiz & Akrout 2021).

    $$B = |B_0| \\circ \\operatorname{sign}(W),$$

    with $B_0$ (the field `magnitude`, in the weight's layout) drawn once like FA's
    feedback and never trained; the signs follow the current $W$ on every call.
    """

    layer: _Layer
    magnitude: Float[Array, "..."]
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self, layer: _Layer, *, feedback_scale: float = 1.0, key: PRNGKeyArray
    ):
        """**Arguments:** as [`bioflax_eqx.FA`][]; `magnitude` is drawn as FA's
        `feedback`."""
        self.magnitude = draw(layer, "FRSF", feedback_scale, key)
        self.layer = layer

    def __check_init__(self):
        check_drawn(self, "magnitude")

    @property
    def feedback(self) -> Float[Array, "..."]:
        return jnp.abs(self.magnitude) * jnp.sign(self.weight)

    def feedback_weight(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "..."]:
        # Checked before it is used: a wrong magnitude would broadcast silently.
        check_feedback("magnitude", self.magnitude, self.weight)
        return self.feedback


class BRSF(AbstractScaledSignRule[_Layer]):
    """Batchwise random-magnitude sign-concordant feedback, brSF (Sanfiz & Akrout
    2021).

    $$B = |M| \\circ \\operatorname{sign}(W), \\qquad
    M \\sim U(-s/\\sqrt{\\mathrm{fan\\_in}}, s/\\sqrt{\\mathrm{fan\\_in}})$$

    with $M$ redrawn on every call from `key` (so every call needs one): under
    `jit` it is, bit for bit, `jax.random.uniform(key, weight.shape,
    minval=-s/√fan_in, maxval=s/√fan_in)`.
    Under `jax.vmap`, share the key across the batch (`in_axes=None`): one draw per
    batch, which also keeps the backward pass a single product. `feedback` returns
    the expected value $\\tfrac{s}{2\\sqrt{\\mathrm{fan\\_in}}}
    \\operatorname{sign}(W)$.
    """

    # The base's own: a type checker would otherwise synthesise a dataclass one.
    __init__ = AbstractScaledSignRule.__init__
    trains_feedback: ClassVar[bool] = False
    fan_in_factor: ClassVar[int] = 1

    @property
    def feedback(self) -> Float[Array, "..."]:
        return (self.scale / 2) * jnp.sign(self.weight)

    def feedback_weight(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "..."]:
        if key is None:
            raise ValueError(
                "BRSF draws new feedback magnitudes on every call: pass `key=`."
            )
        # A fused Threefry: under jit, bit for bit `jax.random.uniform(key,
        # weight.shape, ...)` (run eagerly, float64 may differ in the last bit).
        magnitude = fused_uniform(key, self.weight.shape, self.scale, self.weight.dtype)
        return jnp.abs(magnitude) * jnp.sign(self.weight)
