"""Direct Feedback Alignment: an error channel from the network's output to every
feedback point, in any Equinox model.

The channel is a zero vector threaded through the forward pass next to the
activations. It changes nothing going forward; going backward, `close_error_channel`
puts the network's output error `e` on it, and every feedback point reads `e` from it
and sends `B e` to its activation. Write a model like this:

```python
def __call__(self, x):
    channel = bfx.open_error_channel(x, 10)
    h, channel = self.layer1(x, channel)      # a DFALinear
    h, channel = self.point(block(h), channel)  # a DFAFeedback after any block
    y, channel = self.layer2(jax.nn.relu(h), channel)
    return bfx.close_error_channel(y, channel)
```
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._feedback import close, direct_feedback, open_channel
from ._linear import (
    AbstractFeedbackModule,
    check_array,
    check_linear,
    init_feedback,
    init_parameters,
)
from ._misc import check_input, check_positive, check_scale, default_floating_dtype


def open_error_channel(
    x: Array, error_features: int, dtype=None
) -> Float[Array, " error_features"]:
    """Open the error channel at the start of a model's per-example `__call__`.

    **Arguments:**

    - `x`: the model's input (one example). The channel is made to depend on it so
        that under `jax.vmap` every example carries its own error.
    - `error_features`: the size of the network output.
    - `dtype`: the channel's float dtype; defaults to `x`'s if floating, else JAX's
        default float.

    **Returns:**

    A zero vector of shape `(error_features,)`.
    """
    check_positive(error_features=error_features)
    if dtype is None:
        x_float = jnp.issubdtype(x.dtype, jnp.floating)
        dtype = x.dtype if x_float else default_floating_dtype()
    return open_channel(x, error_features, dtype)


def close_error_channel(
    output: Float[Array, " error_features"], channel: Float[Array, " error_features"]
) -> Float[Array, " error_features"]:
    """Close the error channel at the model's output.

    **Arguments:**

    - `output`: the network output `y` (one example).
    - `channel`: the channel returned by the last feedback point.

    **Returns:**

    `output`, unchanged. On the backward pass its cotangent `e = ∂L/∂y` is also sent
    down the channel to every feedback point.
    """
    if output.shape != channel.shape:
        raise ValueError(
            f"the network output has shape {output.shape} but the error channel has "
            f"shape {channel.shape}; open the channel with "
            f"`error_features={output.size}`."
        )
    return close(output, channel)


def _check_channel(channel: Array, error_features: int, name: str) -> None:
    if channel.shape != (error_features,):
        raise ValueError(
            f"{name} expects an error channel of shape ({error_features},), got "
            f"{channel.shape}; open it with `bfx.open_error_channel`."
        )


class DFAFeedback(AbstractFeedbackModule):
    """A DFA feedback point: place it after any block of an Equinox model.

    Identity going forward. Going backward, the activation `h` it wraps receives

    $$\\bar h = B e,$$

    where `e = ∂L/∂y` is the network's output error read from the error channel;
    whatever cotangent reaches `h` from later layers is discarded, so no backward chain
    runs. Inside the block, ordinary backprop turns `B e` into the block's gradients.
    `feedback` has shape `(features, error_features)` and never trains.
    """

    feedback: Float[Array, "features error_features"]
    features: int = eqx.field(static=True)
    error_features: int = eqx.field(static=True)
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self,
        features: int,
        error_features: int,
        dtype=None,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `features`: the size of the activation it wraps.
        - `error_features`: the size of the network output.
        - `dtype`: defaults to JAX's default float.
        - `feedback_scale`: `B ~ U(-s/√features, s/√features)`, `s = feedback_scale`.
        - `key`: a `jax.random.PRNGKey`.
        """
        check_positive(features=features, error_features=error_features)
        check_scale("feedback_scale", feedback_scale)
        dtype = default_floating_dtype() if dtype is None else dtype
        self.feedback = init_feedback(
            features, error_features, feedback_scale, dtype, key
        )
        self.features = features
        self.error_features = error_features

    def __check_init__(self):
        check_positive(features=self.features, error_features=self.error_features)
        check_array("feedback", self.feedback, (self.features, self.error_features))

    def __call__(
        self,
        h: Float[Array, " features"],
        channel: Float[Array, " error_features"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " features"], Float[Array, " error_features"]]:
        """**Arguments:**

        - `h`: one example's activation, shape `(features,)`.
        - `channel`: the error channel.
        - `key`: ignored.

        **Returns:**

        `(h, channel)`, unchanged.
        """
        check_input(h, self.features, "DFAFeedback")
        _check_channel(channel, self.error_features, "DFAFeedback")
        check_array("feedback", self.feedback, (self.features, self.error_features))
        return direct_feedback(h, channel, self.feedback)


class DFALinear(AbstractFeedbackModule):
    """Direct Feedback Alignment (Nøkland 2016): a dense layer `y = W x + b` whose
    input receives the network's output error directly.

    With `g = ∂L/∂y` at the layer's own output and `e` the network's output error,

    $$\\bar x = B e, \\qquad \\Delta W \\propto g x^\\top, \\qquad \\Delta B = 0,$$

    so in an MLP the hidden update is $\\delta_l = \\phi'(a_l) \\odot B_{l+1} e$ and the
    last layer gets $g = e$. `feedback` has shape `(in_features, error_features)`. The
    layer threads the error channel (see [`bioflax_eqx.open_error_channel`][]); it is a
    linear map with a [`bioflax_eqx.DFAFeedback`][] point at its input.
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    feedback: Float[Array, "in error_features"]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    error_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        error_features: int,
        use_bias: bool = True,
        dtype=None,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`, `out_features`: input and output sizes.
        - `error_features`: the size of the network output (the error `e`).
        - `use_bias`, `dtype`, `feedback_scale`, `key`: as [`bioflax_eqx.FALinear`][];
            `B ~ U(-s/√in, s/√in)`.
        """
        check_positive(error_features=error_features)
        lkey, fkey = jax.random.split(key)
        self.weight, self.bias, _ = init_parameters(
            in_features, out_features, use_bias, dtype, feedback_scale, lkey
        )
        self.feedback = init_feedback(
            in_features, error_features, feedback_scale, self.weight.dtype, fkey
        )
        self.in_features, self.out_features = in_features, out_features
        self.error_features = error_features
        self.use_bias = use_bias

    def __check_init__(self):
        check_linear(self)
        check_positive(error_features=self.error_features)
        check_array("feedback", self.feedback, (self.in_features, self.error_features))

    def __call__(
        self,
        x: Float[Array, " in"],
        channel: Float[Array, " error_features"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " out"], Float[Array, " error_features"]]:
        """**Arguments:**

        - `x`: one example, shape `(in_features,)`.
        - `channel`: the error channel.
        - `key`: ignored.

        **Returns:**

        `(weight @ x + bias, channel)`.
        """
        check_input(x, self.in_features, "DFALinear")
        _check_channel(channel, self.error_features, "DFALinear")
        check_array("feedback", self.feedback, (self.in_features, self.error_features))
        x, channel = direct_feedback(x, channel, self.feedback)
        # The weight path sees no cotangent to `x`, so no Wᵀ chain is ever built.
        y = self.weight @ lax.stop_gradient(x)
        if self.bias is not None:
            y = y + self.bias
        return y, channel
