from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_non_negative_int, check_positive_int, check_vector_input
from ._dfa import DFA, close_error_channel, open_error_channel
from ._layers import rule_of
from ._registry import WRAPPERS, check_rule


def _identity(x):
    return x


class MLP(eqx.Module):
    """A multi-layer perceptron trained by any rule; mirrors `eqx.nn.MLP`.

    `layers` holds `depth + 1` dense layers: `eqx.nn.Linear` for `rule="bp"`, and
    otherwise each `eqx.nn.Linear` wrapped in the rule's class
    ([`bioflax_eqx.FA`][], ..., [`bioflax_eqx.DFA`][]; for DFA the model opens and
    closes the error channel itself). The rule is read off the layers, so
    [`bioflax_eqx.convert`][] turns one rule's MLP into another's.
    """

    layers: tuple[Any, ...]
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
        - `rule`: one of [`bioflax_eqx.RULES`][].
        - `activation`: applied after every hidden layer.
        - `final_activation`: applied to the output (before DFA's error is taken).
        - `use_bias`, `use_final_bias`: biases of the hidden and the last layer.
        - `dtype`: parameter dtype; defaults to JAX's default float.
        - `feedback_scale`: scale of the random feedback (see each rule).
        - `key`: a `jax.random.PRNGKey`.
        """
        check_rule(rule)
        check_positive_int(in_size=in_size, out_size=out_size, width_size=width_size)
        check_non_negative_int(depth=depth)
        sizes = [in_size] + [width_size] * depth + [out_size]
        biases = [use_bias] * depth + [use_final_bias]
        layers = []
        for n_in, n_out, bias, k in zip(
            sizes[:-1], sizes[1:], biases, jax.random.split(key, depth + 1)
        ):
            lkey, fkey = jax.random.split(k)
            layer = eqx.nn.Linear(n_in, n_out, bias, dtype, key=lkey)
            if rule == "dfa":
                layer = DFA(layer, out_size, feedback_scale=feedback_scale, key=fkey)
            elif rule != "bp":
                layer = WRAPPERS[rule](layer, feedback_scale=feedback_scale, key=fkey)
            layers.append(layer)
        self.layers = tuple(layers)
        self.activation = activation
        self.final_activation = final_activation
        self.in_size, self.out_size = in_size, out_size
        self.width_size, self.depth = width_size, depth

    @classmethod
    def from_eqx(cls, mlp: eqx.nn.MLP) -> "MLP":
        """The same network as an `eqx.nn.MLP` (same layers, same activations).

        **Arguments:**

        - `mlp`: an `eqx.nn.MLP` with elementwise activations (no learnt
            parameters in them) and `scan=False`.

        **Returns:**

        A [`bioflax_eqx.MLP`][] holding `mlp`'s layers.
        """
        if getattr(mlp, "scan", False):
            raise ValueError("convert does not support `eqx.nn.MLP(scan=True)`.")
        if jax.tree_util.tree_leaves(eqx.filter(mlp.activation, eqx.is_array)):
            raise ValueError(
                "convert does not support `eqx.nn.MLP` with learnt activations."
            )
        if "scalar" in (mlp.in_size, mlp.out_size):
            raise ValueError("convert does not support `eqx.nn.MLP` with 'scalar'.")
        first, last = mlp.layers[0], mlp.layers[-1]
        new = cls(
            mlp.in_size,  # pyright: ignore[reportArgumentType]
            mlp.out_size,  # pyright: ignore[reportArgumentType]
            mlp.width_size,
            mlp.depth,
            rule="bp",
            activation=mlp.activation,
            final_activation=mlp.final_activation,
            use_bias=first.use_bias,
            use_final_bias=last.use_bias,
            dtype=first.weight.dtype,
            key=jax.random.key(0),  # every layer is replaced below
        )
        return eqx.tree_at(lambda m: m.layers, new, tuple(mlp.layers))

    @property
    def rule(self) -> str | None:
        """The rule of its layers; `None` if tree surgery mixed rules in them."""
        return rule_of(self.layers)

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
        check_vector_input(x, self.in_size, "MLP")
        dfa = any(isinstance(layer, DFA) for layer in self.layers)
        channel = open_error_channel(x, self.out_size) if dfa else None
        keys = (
            [None] * len(self.layers)
            if key is None
            else list(jax.random.split(key, len(self.layers)))
        )
        for i, (layer, k) in enumerate(zip(self.layers, keys)):
            if isinstance(layer, DFA):
                assert channel is not None
                x, channel = layer(x, channel, key=k)  # pyright: ignore
            else:
                x = layer(x, key=k)
            x = self.final_activation(x) if i == self.depth else self.activation(x)
        if channel is not None:
            x = close_error_channel(x, channel)
        return x
