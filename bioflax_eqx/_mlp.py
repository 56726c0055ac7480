from collections.abc import Callable

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from ._dfa import DFALinear, close_error_channel, open_error_channel
from ._misc import check_input, check_positive
from ._rules import DenseLayer, make_linear, rule_of


def _identity(x):
    return x


class MLP(eqx.Module):
    """A multi-layer perceptron trained by any rule; mirrors `eqx.nn.MLP`.

    `layers` holds `depth + 1` dense layers: [`bioflax_eqx.FALinear`][] and friends,
    [`bioflax_eqx.DFALinear`][] for `rule="dfa"` (the model then opens and closes the
    error channel itself), or `eqx.nn.Linear` for `rule="bp"`. The rule is read off the
    layers, so [`bioflax_eqx.convert`][] turns one rule's MLP into another's.
    """

    layers: tuple[DenseLayer, ...]
    activation: Callable = eqx.field(static=True)
    final_activation: Callable = eqx.field(static=True)
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    width_size: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        width_size: int,
        depth: int,
        *,
        rule: str,
        activation: Callable = jax.nn.relu,
        final_activation: Callable = _identity,
        use_bias: bool = True,
        use_final_bias: bool = True,
        dtype=None,
        feedback_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_size`, `out_size`: input and output sizes.
        - `width_size`: the size of each hidden layer.
        - `depth`: the number of hidden layers (`0` gives a single linear layer).
        - `rule`: one of `"bp" | "fa" | "kp" | "dfa" | "usf" | "brsf" | "frsf"`.
        - `activation`: applied after every hidden layer.
        - `final_activation`: applied to the output (before DFA's error is taken).
        - `use_bias`, `use_final_bias`: biases of the hidden and the last layer.
        - `dtype`: parameter dtype; defaults to JAX's default float.
        - `feedback_scale`: scale of the random feedback (see each layer).
        - `key`: a `jax.random.PRNGKey`.
        """
        check_positive(in_size=in_size, out_size=out_size, width_size=width_size)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"`depth` must be a non-negative integer, got {depth!r}.")
        sizes = [in_size] + [width_size] * depth + [out_size]
        biases = [use_bias] * depth + [use_final_bias]
        keys = jax.random.split(key, depth + 1)
        self.layers = tuple(
            make_linear(
                rule,
                n_in,
                n_out,
                bias,
                dtype,
                error_features=out_size,
                feedback_scale=feedback_scale,
                key=k,
            )
            for n_in, n_out, bias, k in zip(sizes[:-1], sizes[1:], biases, keys)
        )
        self.activation = activation
        self.final_activation = final_activation
        self.in_size, self.out_size = in_size, out_size
        self.width_size, self.depth = width_size, depth

    @property
    def rule(self) -> str:
        """The rule of the first layer (every layer's, for an MLP built here)."""
        return rule_of(self.layers[0])

    def __call__(
        self, x: Float[Array, " in_size"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " out_size"]:
        """**Arguments:**

        - `x`: one example, shape `(in_size,)`; batch with `jax.vmap`.
        - `key`: needed by rules that draw random feedback every call (`"brsf"`).
            Under `jax.vmap` pass it unbatched (`in_axes=None`).

        **Returns:**

        The output, shape `(out_size,)`.
        """
        check_input(x, self.in_size, "MLP")
        dfa = any(isinstance(layer, DFALinear) for layer in self.layers)
        channel = open_error_channel(x, self.out_size) if dfa else None
        keys = (
            [None] * len(self.layers)
            if key is None
            else list(jax.random.split(key, len(self.layers)))
        )
        for i, (layer, k) in enumerate(zip(self.layers, keys)):
            if isinstance(layer, DFALinear):
                assert channel is not None
                x, channel = layer(x, channel, key=k)
            else:
                x = layer(x, key=k)
            x = self.final_activation(x) if i == self.depth else self.activation(x)
        if channel is not None:
            x = close_error_channel(x, channel)
        return x
