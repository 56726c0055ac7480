"""Direct Feedback Alignment: feedback points and layers that read the network's
output error from the error channel (see `_channel.py`), in any Equinox model.

The channel is zeros threaded through the forward pass next to the activations. It
changes nothing going forward; going backward, `close_error_channel` puts the
network's output error `e` on it, and every feedback point reads `e` from it and
sends `B e` to its activation. [`bioflax_eqx.Sequential`][] threads it for you; in a
model of your own, write

```python
def __call__(self, x):
    channel = bfx.open_error_channel(x, 10)
    h, channel = self.layer1(x, channel)        # a bfx.DFA around any layer
    h, channel = self.point(block(h), channel)  # a bfx.DFAFeedback after any block
    y, channel = self.layer2(jax.nn.relu(h), channel)
    return bfx.close_error_channel(y, channel)
```

A sequence model opens a per-token channel, `bfx.open_error_channel(tokens, (context,
vocab))`, and its points hold `B` of shape `(width, vocab)` for activations of shape
`(context, width)` (see [`bioflax_eqx.Transformer`][]).
"""

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import equinox as eqx
import jax
from equinox.nn import State, StatefulLayer
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._channel import (
    as_shape,
    check_point,
    close_error_channel,
    init_feedback,
    open_error_channel,
)
from ._feedback import direct_feedback
from ._misc import default_floating_dtype
from ._rules import AbstractFeedback, AbstractWrapper


_Layer = TypeVar("_Layer", bound=Callable)

# A marker for "no state passed" (as `eqx.nn.Sequential` has).
_sentinel: Any = object()


class DFAFeedback(AbstractFeedback):
    """A DFA feedback point: place it after any block of an Equinox model.

    Identity going forward. Going backward, the activation `h` it wraps receives

    $$\\bar h = B e, \\qquad (B e)_{i} = \\sum_k B_{ik} e_k,$$

    where `e = ∂L/∂y` is the network's output error read from the error channel and
    `i` runs over every entry of `h` (any shape, e.g. a conv feature map); whatever
    cotangent reaches `h` from later layers is discarded, so no backward chain runs.
    Inside the block, ordinary backprop turns `B e` into the block's gradients.
    `feedback` has shape `(*shape, error_features)` and never trains.

    With a per-token channel (an error `e` of shape `(*positions, error_features)`,
    e.g. `(context, vocab)`), `shape` is one position's activation and `B` is shared
    across positions (Launay et al. 2020): `h` has shape `(*positions, *shape)` and
    position `t` receives $\\bar h_t = B e_t$, i.e. $\\bar h = e B^\\top$ for `B` of
    shape `(width, vocab)`.
    """

    feedback: Float[Array, "*shape error_features"]
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self,
        shape: int | Sequence[int],
        error_features: int,
        dtype=None,
        *,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `shape`: the shape of the activation it wraps (an int for a vector); per
            token, of one position's activation.
        - `error_features`: the size of the network output (per token: its last
            axis, e.g. the vocabulary).
        - `dtype`: defaults to JAX's default float.
        - `feedback_scale`: `B ~ U(-s/√size, s/√size)`, `s = feedback_scale`, `size`
            the number of entries of the activation.
        - `key`: a `jax.random.PRNGKey`.
        """
        dtype = default_floating_dtype() if dtype is None else dtype
        self.feedback = init_feedback(
            as_shape(shape, "shape"), error_features, feedback_scale, dtype, key
        )

    def __check_init__(self):
        if self.feedback.ndim < 2:
            raise ValueError("`feedback` must have shape (*shape, error_features).")

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the activation it wraps."""
        return self.feedback.shape[:-1]

    @property
    def error_features(self) -> int:
        return self.feedback.shape[-1]

    def __call__(
        self,
        h: Float[Array, "..."],
        channel: Float[Array, "*positions error_features"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "..."], Float[Array, "*positions error_features"]]:
        """**Arguments:**

        - `h`: one example's activation, of shape `(*positions, *shape)`.
        - `channel`: the error channel, of shape `(*positions, error_features)`
            (`positions = ()` for one error vector per example).
        - `key`: ignored.

        **Returns:**

        `(h, channel)`, unchanged.
        """
        check_point("DFAFeedback", self.feedback, h, channel)
        h, channel = direct_feedback(h, channel, self.feedback)
        # What later layers would send back to `h` is discarded: with no cotangent
        # asked of it, it is never computed (no backward through their inputs).
        return lax.stop_gradient(h), channel


def _is_stateful(layer: object) -> bool:
    return isinstance(layer, StatefulLayer) and layer.is_stateful()


def _input_shape(layer: object) -> tuple[int, ...] | None:
    if isinstance(layer, eqx.nn.Linear) and layer.in_features != "scalar":
        return (layer.in_features,)
    return None


class DFA(AbstractWrapper[_Layer]):
    """Direct Feedback Alignment (Nøkland 2016) around any layer or block.

    A [`bioflax_eqx.DFAFeedback`][] point at the input of `layer`, then `layer` itself
    with plain backprop inside. With `g = ∂L/∂y` at the layer's own output and `e` the
    network's output error, for a dense layer

    $$\\bar x = B e, \\qquad \\Delta W \\propto g x^\\top, \\qquad \\Delta B = 0,$$

    so in an MLP the hidden update is $\\delta_l = \\phi'(a_l) \\odot B_{l+1} e$ and the
    last layer gets $g = e$. No cotangent of `layer`'s input is ever computed through
    its weights: the chain is cut. `feedback` has shape `(*input_shape,
    error_features)` (`(in_features, error_features)` for a dense layer). Wrapping a
    whole block (a residual block, an attention block) gives Launay et al.'s "macro"
    placement: one feedback point per block, backprop inside it.

    The call threads the error channel (see [`bioflax_eqx.open_error_channel`][]);
    [`bioflax_eqx.Sequential`][] and [`bioflax_eqx.MLP`][] do it for you.
    """

    layer: _Layer
    feedback: Float[Array, "*input_shape error_features"]
    trains_feedback: ClassVar[bool] = False

    def __init__(
        self,
        layer: _Layer,
        error_features: int,
        *,
        input_shape: int | Sequence[int] | None = None,
        feedback_scale: float = 1.0,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `layer`: any Equinox layer or block, called as `layer(x, key=key)` (or
            `layer(x, state, key=key)` if it is a stateful layer).
        - `error_features`: the size of the network output (the error `e`).
        - `input_shape`: the shape of one example's input to `layer`; read off an
            `eqx.nn.Linear`, needed for anything else (a conv's input size is not
            part of the layer).
        - `feedback_scale`: `B ~ U(-s/√size, s/√size)`, `s = feedback_scale`, `size`
            the number of entries of the input.
        - `dtype`: the dtype of `B`; defaults to the layer's weight's, else JAX's
            default float.
        - `key`: a `jax.random.PRNGKey`.
        """
        shape = _input_shape(layer) if input_shape is None else input_shape
        if shape is None:
            raise ValueError(
                f"DFA needs `input_shape=` (one example's input shape) to wrap a "
                f"{type(layer).__name__}: its feedback has shape "
                f"(*input_shape, error_features)."
            )
        if dtype is None:
            weight = getattr(layer, "weight", None)
            dtype = (
                weight.dtype  # pyright: ignore[reportOptionalMemberAccess]
                if eqx.is_inexact_array(weight)
                else default_floating_dtype()
            )
        self.layer = layer
        self.feedback = init_feedback(
            as_shape(shape, "input_shape"), error_features, feedback_scale, dtype, key
        )

    def __check_init__(self):
        if self.feedback.ndim < 2:
            raise ValueError(
                "`feedback` must have shape (*input_shape, error_features)."
            )
        expected = _input_shape(self.layer)
        if expected is not None and self.feedback.shape[:-1] != expected:
            raise ValueError(
                f"`feedback` must have shape {(*expected, self.error_features)} for "
                f"this layer, got {self.feedback.shape}."
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.feedback.shape[:-1]

    @property
    def error_features(self) -> int:
        return self.feedback.shape[-1]

    def is_stateful(self) -> bool:
        """Whether the wrapped layer takes and returns a state."""
        return _is_stateful(self.layer)

    def __call__(
        self,
        x: Float[Array, "..."],
        channel: Float[Array, "*positions error_features"],
        state: State | Any = _sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> (
        tuple[Array, Float[Array, "*positions error_features"]]
        | tuple[Array, Float[Array, "*positions error_features"], State]
    ):
        """**Arguments:**

        - `x`: one example's input to the layer, of shape `(*positions,
            *input_shape)`.
        - `channel`: the error channel, of shape `(*positions, error_features)`.
        - `state`: passed to a stateful layer (then the state is returned too).
        - `key`: passed to the layer.

        **Returns:**

        `(layer(x), channel)`, or `(y, channel, state)` when `state` is passed.
        """
        check_point(type(self).__name__, self.feedback, x, channel)
        with jax.named_scope("bfx.DFA"):
            x, channel = direct_feedback(x, channel, self.feedback)
        # The layer sees no cotangent to `x`, so no chain through its weights.
        x = lax.stop_gradient(x)
        if state is _sentinel:
            return self.layer(x, key=key), channel
        if self.is_stateful():
            y, state = self.layer(x, state, key=key)  # pyright: ignore[reportCallIssue]
        else:
            y = self.layer(x, key=key)
        return y, channel, state


def error_features_of(layers: Sequence[object]) -> int | None:
    """The output size that the DFA units among `layers` (nested `Sequential`s
    included) expect; `None` if there are none. They must agree."""
    sizes = {
        x.error_features
        for x in jax.tree_util.tree_leaves(
            list(layers), is_leaf=lambda x: isinstance(x, DFA | DFAFeedback)
        )
        if isinstance(x, DFA | DFAFeedback)
    }
    if len(sizes) > 1:
        raise ValueError(f"the DFA layers disagree on `error_features`: {sizes}.")
    return sizes.pop() if sizes else None


class Sequential(StatefulLayer):
    """`eqx.nn.Sequential` that also threads DFA's error channel.

    Calls its layers in order, like `eqx.nn.Sequential` (a key split per layer, state
    passed to stateful layers). If any layer is a [`bioflax_eqx.DFA`][] or a
    [`bioflax_eqx.DFAFeedback`][] point (here or in a nested `Sequential`), it opens
    the error channel from its input, passes it through those layers and closes it
    at its output, so a conv net trained by DFA needs no channel code at all. Any
    other layer (activations, pooling, norms, blocks) runs on plain backprop.
    """

    layers: tuple[Callable, ...]

    def __init__(self, layers: Sequence[Callable]):
        """**Arguments:**

        - `layers`: the layers, called in order.
        """
        self.layers = tuple(layers)

    def __check_init__(self):
        error_features_of(self.layers)

    def __getitem__(self, i: int) -> Callable:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def is_stateful(self) -> bool:
        return any(
            _is_stateful(x) or (isinstance(x, DFA) and x.is_stateful())
            for x in self.layers
        )

    @property
    def error_features(self) -> int | None:
        """The network output size its DFA layers expect, or `None` without any."""
        return error_features_of(self.layers)

    def thread(
        self,
        x: Array,
        channel: Float[Array, " error_features"] | None,
        state: State | Any = _sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Array, Float[Array, " error_features"] | None, State | Any]:
        """Run the layers with an already open error channel (as a nested
        `Sequential` is run).

        **Arguments:**

        - `x`: the input.
        - `channel`: the open error channel, or `None` if no layer needs one.
        - `state`: passed to and updated from stateful layers.
        - `key`: split between the layers.

        **Returns:**

        `(output, channel, state)`.
        """
        keys = (
            [None] * len(self.layers)
            if key is None
            else jax.random.split(key, len(self.layers))
        )
        for layer, k in zip(self.layers, keys):
            if isinstance(layer, Sequential):
                x, channel, state = layer.thread(x, channel, state, key=k)
            elif isinstance(layer, DFA | DFAFeedback):
                if channel is None:
                    raise ValueError("a DFA layer needs an open error channel.")
                if isinstance(layer, DFA) and layer.is_stateful():
                    x, channel, state = layer(x, channel, state, key=k)  # pyright: ignore
                else:
                    x, channel = layer(x, channel, key=k)  # pyright: ignore
            elif _is_stateful(layer):
                x, state = layer(x, state=state, key=k)  # pyright: ignore
            else:
                x = layer(x, key=k)
        return x, channel, state

    def __call__(
        self,
        x: Array,
        state: State | Any = _sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Array | tuple[Array, State]:
        """**Arguments:**

        - `x`: one example, passed to the first layer.
        - `state`: if given, passed to and updated from every stateful layer.
        - `key`: if given, split into a key per layer.

        **Returns:**

        The output of the last layer, or `(output, state)` if `state` was given.
        """
        n = self.error_features
        channel = None if n is None else open_error_channel(x, n)
        x, channel, state = self.thread(x, channel, state, key=key)
        if channel is not None:
            x = close_error_channel(x, channel)
        return x if state is _sentinel else (x, state)
