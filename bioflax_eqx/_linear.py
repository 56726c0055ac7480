import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._feedback import reroute, tie
from ._kernels import row_major, uniform as fused_uniform
from ._misc import (
    check_input,
    check_positive,
    check_scale,
    default_floating_dtype,
    uniform,
)


def init_linear(
    in_features: int, out_features: int, use_bias: bool, dtype, key: PRNGKeyArray
) -> tuple[Float[Array, "out in"], Float[Array, " out"] | None]:
    """`eqx.nn.Linear`'s initialisation: weight and bias U(-1/sqrt(in), 1/sqrt(in))."""
    wkey, bkey = jax.random.split(key)
    bound = 1 / math.sqrt(in_features)
    weight = uniform(wkey, (out_features, in_features), bound, dtype)
    bias = uniform(bkey, (out_features,), bound, dtype) if use_bias else None
    return weight, bias


def init_feedback(
    in_features: int, columns: int, scale: float, dtype, key: PRNGKeyArray
) -> Float[Array, "in columns"]:
    """A fresh draw from the weight's distribution, U(-s/sqrt(in), s/sqrt(in)), with
    the layer's `in_features` as fan-in and `s = feedback_scale`."""
    return uniform(key, (in_features, columns), scale / math.sqrt(in_features), dtype)


def init_parameters(
    in_features: int,
    out_features: int,
    use_bias: bool,
    dtype,
    feedback_scale: float,
    key: PRNGKeyArray,
) -> tuple[Float[Array, "out in"], Float[Array, " out"] | None, Float[Array, "in out"]]:
    """Validate the arguments shared by every feedback layer, then draw the weight,
    bias and a feedback matrix of the shape of `Wᵀ` (layers without one discard it).
    """
    check_positive(in_features=in_features, out_features=out_features)
    check_scale("feedback_scale", feedback_scale)
    dtype = default_floating_dtype() if dtype is None else dtype
    lkey, fkey = jax.random.split(key)
    weight, bias = init_linear(in_features, out_features, use_bias, dtype, lkey)
    feedback = init_feedback(in_features, out_features, feedback_scale, dtype, fkey)
    return weight, bias, feedback


def check_array(name: str, array: Array | None, shape: tuple[int, ...]) -> None:
    if array is None or array.shape != shape:
        got = None if array is None else array.shape
        raise ValueError(f"`{name}` must have shape {shape}, got {got}.")


class AbstractFeedbackModule(eqx.Module):
    """Anything holding feedback weights. `trains_feedback` says whether its feedback
    arrays receive gradients (Kolen-Pollack) or must never move (every other rule);
    [`bioflax_eqx.feedback_labels`][] reads it to build optimiser masks.
    """

    trains_feedback: eqx.AbstractClassVar[bool]


class AbstractFeedbackLinear(AbstractFeedbackModule):
    """A dense layer `y = W x + b` whose backward pass sends the error to its input
    through a feedback matrix `B` (shape of `Wᵀ`) instead of `Wᵀ`.

    With `g = ∂L/∂y` the cotangent at the layer's output, every rule computes

    - weight gradient `g xᵀ` and bias gradient `g` (ordinary autodiff, as in backprop);
    - input cotangent `B g` where backprop would use `Wᵀ g`.

    The rules differ only in `B` and in whether `B` learns. Layers act on one example;
    batch with `jax.vmap`. The weight gradient stays one matrix product over the batch.
    """

    weight: eqx.AbstractVar[Float[Array, "out in"]]
    bias: eqx.AbstractVar[Float[Array, " out"] | None]
    in_features: eqx.AbstractVar[int]
    out_features: eqx.AbstractVar[int]
    use_bias: eqx.AbstractVar[bool]
    # `B` (a field, or for sign symmetry a property derived from `W`; brSF: its mean).
    feedback: eqx.AbstractVar[Float[Array, "in out"]]

    @abc.abstractmethod
    def feedback_matrix(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "in out"]:
        """The matrix that carries the error to this layer's input on this call.

        **Arguments:**

        - `key`: only for rules that draw random feedback on every call (brSF).

        **Returns:**

        `B`, of shape `(in_features, out_features)`.
        """

    @abc.abstractmethod
    def _feedback_for_call(
        self, key: PRNGKeyArray | None
    ) -> tuple[Float[Array, "in out"] | Float[Array, "out in"], bool]:
        """`(B, False)`, or `(Bᵀ, True)` for rules that build `Bᵀ` in the weight's
        layout more cheaply; the same matrix as `feedback_matrix(key=key)`."""

    def __call__(
        self, x: Float[Array, " in"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " out"]:
        """**Arguments:**

        - `x`: one example, shape `(in_features,)`.
        - `key`: randomness for rules that draw feedback on every call (brSF); ignored
            otherwise. Under `jax.vmap`, pass the same key to every example
            (`in_axes=None`) so the whole batch shares one draw.

        **Returns:**

        `weight @ x + bias`, shape `(out_features,)`.
        """
        check_input(x, self.in_features, type(self).__name__)
        feedback, transposed = self._feedback_for_call(key)
        # Also catches feedback replaced by tree surgery, which skips __check_init__.
        shape = (self.in_features, self.out_features)
        check_array("feedback", feedback, shape[::-1] if transposed else shape)
        weight = (
            tie(self.weight, self.feedback) if self.trains_feedback else self.weight
        )
        y = weight @ lax.stop_gradient(x)
        if self.bias is not None:
            y = y + self.bias
        return reroute(y, x, feedback, transposed=transposed)


def check_linear(layer) -> None:
    """The invariants shared by every dense feedback layer (sizes, weight, bias)."""
    check_positive(in_features=layer.in_features, out_features=layer.out_features)
    check_array("weight", layer.weight, (layer.out_features, layer.in_features))
    if layer.use_bias:
        check_array("bias", layer.bias, (layer.out_features,))
    elif layer.bias is not None:
        raise ValueError("`bias` must be None when `use_bias=False`.")


class FALinear(AbstractFeedbackLinear):
    """Feedback Alignment (Lillicrap et al. 2016).

    The error reaches the layer's input through a fixed random matrix:

    $$\\bar x = B g, \\qquad \\Delta W \\propto g x^\\top, \\qquad \\Delta B = 0,$$

    so in a network $\\delta_l = \\phi'(a_l) \\odot B_{l+1} \\delta_{l+1}$. `feedback`
    receives a zero gradient; mask it out of the optimiser (see
    [`bioflax_eqx.freeze_feedback`][]) so weight decay never moves it.
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    feedback: Float[Array, "in out"]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        dtype=None,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`, `out_features`: input and output sizes.
        - `use_bias`: whether to add a bias.
        - `dtype`: parameter dtype; defaults to JAX's default float.
        - `feedback_scale`: `B` is drawn from `U(-s/√in, s/√in)` with `s =
            feedback_scale`, an independent draw from the weight's distribution.
        - `key`: a `jax.random.PRNGKey`.
        """
        self.weight, self.bias, self.feedback = init_parameters(
            in_features, out_features, use_bias, dtype, feedback_scale, key
        )
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = use_bias

    def __check_init__(self):
        check_linear(self)
        check_array("feedback", self.feedback, (self.in_features, self.out_features))

    def feedback_matrix(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "in out"]:
        return self.feedback

    def _feedback_for_call(
        self, key: PRNGKeyArray | None
    ) -> tuple[Float[Array, "in out"], bool]:
        return self.feedback, False


class KPLinear(AbstractFeedbackLinear):
    """Kolen-Pollack (Kolen & Pollack 1994; Akrout et al. 2019).

    As Feedback Alignment, but `B` learns the transposed weight update:

    $$\\bar x = B g, \\qquad \\Delta W \\propto g x^\\top, \\qquad
    \\Delta B = \\Delta W^\\top.$$

    With the same weight decay $\\lambda$ on $W$ and $B$ and learning rate $\\eta$,
    $W_t - B_t^\\top = (1 - \\eta\\lambda)^t (W_0 - B_0^\\top)$ under SGD, and the same
    holds for decoupled decay with any elementwise optimiser (AdamW). Use
    [`bioflax_eqx.decay_mask`][], which includes `feedback` for this layer.
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    feedback: Float[Array, "in out"]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    trains_feedback: ClassVar[bool] = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        dtype=None,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:** as [`bioflax_eqx.FALinear`][]."""
        self.weight, self.bias, self.feedback = init_parameters(
            in_features, out_features, use_bias, dtype, feedback_scale, key
        )
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = use_bias

    def __check_init__(self):
        check_linear(self)
        check_array("feedback", self.feedback, (self.in_features, self.out_features))

    def feedback_matrix(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "in out"]:
        return self.feedback

    def _feedback_for_call(
        self, key: PRNGKeyArray | None
    ) -> tuple[Float[Array, "in out"], bool]:
        return self.feedback, False


class USFLinear(AbstractFeedbackLinear):
    """Uniform sign-concordant feedback, uSF (Liao, Leibo & Poggio 2016; named as in
    Sanfiz & Akrout 2021).

    $$B = s \\, \\operatorname{sign}(W)^\\top,$$

    recomputed from the current $W$ on every call, with a fixed scale $s$. The default
    $s$ is the standard deviation of the initial weights, $1/\\sqrt{3 \\cdot
    \\mathrm{in}}$, times `feedback_scale`. Nothing in $B$ is learned or stored.
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    scale: float = eqx.field(static=True)
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        dtype=None,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:** as [`bioflax_eqx.FALinear`][]; `feedback_scale` multiplies
        the default scale `1/√(3·in)`."""
        self.weight, self.bias, _ = init_parameters(
            in_features, out_features, use_bias, dtype, feedback_scale, key
        )
        self.scale = feedback_scale / math.sqrt(3 * in_features)
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = use_bias

    def __check_init__(self):
        check_linear(self)
        check_scale("scale", self.scale)

    @property
    def feedback(self) -> Float[Array, "in out"]:
        return self.scale * jnp.sign(self.weight).T

    def feedback_matrix(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "in out"]:
        return self.feedback

    def _feedback_for_call(
        self, key: PRNGKeyArray | None
    ) -> tuple[Float[Array, "out in"], bool]:
        # Bᵀ in the weight's layout: elementwise in W, no transpose at all.
        return self.scale * jnp.sign(self.weight), True


class FRSFLinear(AbstractFeedbackLinear):
    """Fixed random-magnitude sign-concordant feedback, frSF (Sanfiz & Akrout 2021).

    $$B = |B_0| \\circ \\operatorname{sign}(W)^\\top,$$

    with $B_0$ (the field `magnitude`) drawn once like FA's feedback and never trained;
    the signs follow the current $W$ on every call.
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    magnitude: Float[Array, "in out"]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        dtype=None,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:** as [`bioflax_eqx.FALinear`][]; `magnitude` is drawn as FA's
        `feedback`."""
        self.weight, self.bias, self.magnitude = init_parameters(
            in_features, out_features, use_bias, dtype, feedback_scale, key
        )
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = use_bias

    def __check_init__(self):
        check_linear(self)
        check_array("magnitude", self.magnitude, (self.in_features, self.out_features))

    @property
    def feedback(self) -> Float[Array, "in out"]:
        return jnp.abs(self.magnitude) * jnp.sign(self.weight).T

    def feedback_matrix(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "in out"]:
        return self.feedback

    def _feedback_for_call(
        self, key: PRNGKeyArray | None
    ) -> tuple[Float[Array, "out in"], bool]:
        # Bᵀ in the weight's layout: one plain transpose of the fixed magnitudes,
        # then elementwise work on contiguous rows (see `row_major`).
        return jnp.abs(row_major(self.magnitude.T)) * jnp.sign(self.weight), True


class BRSFLinear(AbstractFeedbackLinear):
    """Batchwise random-magnitude sign-concordant feedback, brSF (Sanfiz & Akrout 2021).

    $$B = |M| \\circ \\operatorname{sign}(W)^\\top, \\qquad
    M \\sim U(-s/\\sqrt{\\mathrm{in}}, s/\\sqrt{\\mathrm{in}})$$

    with $M$ redrawn on every call from `key` (so every call needs one): it is
    `jax.random.uniform(key, (out, in), minval=-s/√in, maxval=s/√in).T`, drawn in the
    weight's layout. Under
    `jax.vmap`, share the key across the batch (`in_axes=None`): one draw per batch,
    which also keeps the backward pass a single matrix product. `feedback` returns the
    expected value $\\tfrac{s}{2\\sqrt{\\mathrm{in}}} \\operatorname{sign}(W)^\\top$.
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    scale: float = eqx.field(static=True)
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        dtype=None,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:** as [`bioflax_eqx.FALinear`][]; `M` is drawn from
        `U(-s/√in, s/√in)` with `s = feedback_scale`."""
        self.weight, self.bias, _ = init_parameters(
            in_features, out_features, use_bias, dtype, feedback_scale, key
        )
        self.scale = feedback_scale / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = use_bias

    def __check_init__(self):
        check_linear(self)
        check_scale("scale", self.scale)

    @property
    def feedback(self) -> Float[Array, "in out"]:
        return (self.scale / 2) * jnp.sign(self.weight).T

    def feedback_matrix(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "in out"]:
        return self._feedback_for_call(key)[0].T

    def _feedback_for_call(
        self, key: PRNGKeyArray | None
    ) -> tuple[Float[Array, "out in"], bool]:
        if key is None:
            raise ValueError(
                "BRSFLinear draws new feedback magnitudes on every call: pass `key=`."
            )
        # `M` is drawn in the weight's layout, so `Bᵀ` needs no transpose; a fused
        # Threefry, bit for bit `jax.random.uniform(key, (out, in), ...)`.
        magnitude = fused_uniform(key, self.weight.shape, self.scale, self.weight.dtype)
        return jnp.abs(magnitude) * jnp.sign(self.weight), True
