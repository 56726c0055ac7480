"""Alignment metrics: how close a rule's learning signal is to backprop's.

Every angle is in degrees, in `[0, 180]`: 0° means the same direction, 90° orthogonal
(no better than a random direction in high dimension), 180° opposite. The model is
called per example as `model(x, key=key)` and batched with `jax.vmap`, as
[`bioflax_eqx.MLP`][] is; backprop's reference is [`bioflax_eqx.convert`][]`(model,
"bp")`, the same weights with every feedback layer turned into `eqx.nn.Linear`.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Shaped

from ._convert import convert
from ._dfa import DFA
from ._layers import is_node, linear_layers
from ._lowering import xla_layers
from ._rules import AbstractRule


# The loss of one example: `loss_fn(output, target) -> scalar`.
LossFn = Callable[[Array, Array], Array]


def _unit(leaves: list[Array]) -> Float[Array, " n"]:
    flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
    return flat / jnp.linalg.norm(flat)


def angle(a: PyTree[Array], b: PyTree[Array]) -> Float[Array, ""]:
    """The angle between two arrays (or pytrees of arrays), flattened into vectors.

    $$\\angle(a, b) = \\arccos \\frac{\\langle a, b \\rangle}{\\|a\\| \\, \\|b\\|},$$

    computed as $2 \\operatorname{atan2}(\\|\\hat a - \\hat b\\|, \\|\\hat a + \\hat
    b\\|)$ with $\\hat a = a / \\|a\\|$, which stays accurate near 0° and 180° where
    `arccos` loses half the digits.

    **Arguments:**

    - `a`, `b`: arrays, or pytrees of arrays with the same structure and shapes.

    **Returns:**

    The angle in degrees, a scalar in `[0, 180]`; NaN if either is zero.
    """
    a_leaves, a_def = jax.tree_util.tree_flatten(a)
    b_leaves, b_def = jax.tree_util.tree_flatten(b)
    if a_def != b_def or [x.shape for x in a_leaves] != [x.shape for x in b_leaves]:
        raise ValueError("`angle` needs two arrays or pytrees of the same shapes.")
    if not a_leaves:
        raise ValueError("`angle` needs at least one array.")
    ua, ub = _unit(a_leaves), _unit(b_leaves)
    radians = 2 * jnp.arctan2(jnp.linalg.norm(ua - ub), jnp.linalg.norm(ua + ub))
    return jnp.degrees(radians)


def _norm(leaves: list[Array]) -> Float[Array, ""]:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def weight_alignment(model: PyTree) -> dict[str, Float[Array, ""]]:
    """How close each layer's feedback matrix is to the transposed weight.

    For every layer with feedback weights $B$ of the weight's shape (FA, KP and sign
    symmetry; not DFA, whose $B$ maps the output error), kernels flattened:

    - `weight_angle/i`: $\\angle(W_i, B_i)$, in the papers' layout $\\angle(W_i,
        B_i^\\top)$ for a dense layer. 0° is backprop's feedback (up to a
        positive scale); FA starts near 90°; KP with weight decay falls towards 0°.
    - `feedback_norm_ratio/i`: $\\|B_i\\|_F / \\|W_i\\|_F$.

    `B` is the layer's `feedback`: for sign symmetry derived from the current $W$,
    for brSF its expected value.

    **Arguments:**

    - `model`: any model holding feedback layers.

    **Returns:**

    A dict from metric name to scalar; `i` counts the model's linear layers (all
    of them, in pytree order, feedback or not), starting at 0.
    """
    out = {}
    for i, layer in enumerate(linear_layers(model)):
        if isinstance(layer, AbstractRule):
            out[f"weight_angle/{i}"] = angle(layer.weight, layer.feedback)
            out[f"feedback_norm_ratio/{i}"] = _norm([layer.feedback]) / _norm(
                [layer.weight]
            )
    return out


def _backprop(model: PyTree) -> PyTree:
    bp = convert(model, "bp")
    if len(linear_layers(bp)) != len(linear_layers(model)):
        raise ValueError("converting the model to backprop changed its layers.")
    return bp


class _Probe(eqx.Module):
    """A layer whose output gets `shift` added: the gradient with respect to a zero
    shift is the error at that output. Without a shift it records its output shape
    (while tracing)."""

    layer: Callable
    shift: Array | None
    index: int = eqx.field(static=True)
    shapes: dict | None = eqx.field(static=True)

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        if self.shapes is not None:
            shape = self.shapes.setdefault(self.index, y.shape)
            if shape != y.shape:
                raise ValueError("a layer called twice with different output shapes.")
            return out
        assert self.shift is not None
        y = y + self.shift
        return (y, *out[1:]) if isinstance(out, tuple) else y


def _probed(model: PyTree, shifts: list[Array] | None, shapes: dict | None) -> PyTree:
    """`model` with a probe on the output of each of its linear layers (inside a
    DFA wrapper, which must stay outermost for the model to thread its channel)."""
    count = iter(range(1 << 30))

    def probe(x):
        if not is_node(x):
            return x
        i = next(count)
        shift = None if shifts is None else shifts[i]
        if isinstance(x, DFA):
            return eqx.tree_at(lambda m: m.layer, x, _Probe(x.layer, shift, i, shapes))
        return _Probe(x, shift, i, shapes)

    return jax.tree_util.tree_map(probe, model, is_leaf=is_node)


def _signals(model, x, y, loss_fn: LossFn, key) -> tuple[list[Array], list[Array]]:
    """Every linear layer's weight gradient and per-example error, from one backward
    pass of the summed loss.

    The errors are measured with a zero probe added to each layer's output per
    example: the gradient with respect to the probe is the error at that output.
    """
    # The probes wrap `eqx.nn.Conv`s; a lowered one (`Im2colConv`) is restored first,
    # since this is one plain call, outside any loop.
    model = xla_layers(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    layers = linear_layers(model)
    shapes: dict[int, tuple[int, ...]] = {}
    jax.eval_shape(lambda xi: _probed(model, None, shapes)(xi, key=key), x[0])
    if sorted(shapes) != list(range(len(layers))):
        raise ValueError("the model did not call every one of its linear layers.")
    probes = [
        jnp.zeros((x.shape[0], *shapes[i]), layer.weight.dtype)
        for i, layer in enumerate(layers)
    ]

    def total(params, probes):
        model = eqx.combine(params, static)

        def one(xi, yi, shifts):
            return loss_fn(_probed(model, shifts, None)(xi, key=key), yi)

        return jnp.sum(jax.vmap(one)(x, y, probes))

    grads, deltas = jax.grad(total, argnums=(0, 1))(params, probes)
    return [layer.weight for layer in linear_layers(grads)], deltas


def _gradient_metrics(rule: list[Array], bp: list[Array]) -> dict[str, Array]:
    out = {}
    for i, (g, g_bp) in enumerate(zip(rule, bp)):
        out[f"grad_angle/{i}"] = angle(g, g_bp)
        out[f"grad_norm_ratio/{i}"] = _norm([g]) / _norm([g_bp])
    out["grad_angle/global"] = angle(rule, bp)
    out["grad_norm_ratio/global"] = _norm(rule) / _norm(bp)
    return out


def _delta_metrics(rule: list[Array], bp: list[Array]) -> dict[str, Array]:
    out = {
        f"delta_angle/{i}": angle(d, d_bp) for i, (d, d_bp) in enumerate(zip(rule, bp))
    }
    out["delta_angle/global"] = angle(rule, bp)
    return out


def gradient_alignment(
    model: PyTree,
    x: Shaped[Array, "batch ..."],
    y: Shaped[Array, "batch ..."],
    loss_fn: LossFn,
    *,
    key: PRNGKeyArray | None = None,
) -> dict[str, Float[Array, ""]]:
    """The angle between the rule's weight gradient and backprop's, at the same
    parameters and batch.

    With $L = \\frac1N \\sum_n \\ell(f(x_n), y_n)$, $G_i$ the gradient the rule
    assigns to layer $i$'s weight $W_i$ (the direction plain SGD would step against)
    and $G_i^{\\mathrm{BP}} = \\partial L / \\partial W_i$ the true gradient:

    - `grad_angle/i`: $\\angle(G_i, G_i^{\\mathrm{BP}})$;
    - `grad_angle/global`: the angle between all weight gradients concatenated;
    - `grad_norm_ratio/i`: $\\|G_i\\|_F / \\|G_i^{\\mathrm{BP}}\\|_F$, and
        `grad_norm_ratio/global` over all weights.

    The last layer's gradient is the same under every rule (0°). Biases are left out.

    **Arguments:**

    - `model`: the model, called per example as `model(x, key=key)`.
    - `x`, `y`: a batch of inputs and targets.
    - `loss_fn`: the loss of one example, `loss_fn(output, target) -> scalar`.
    - `key`: passed to the model; needed by rules that draw feedback (brSF).

    **Returns:**

    A dict from metric name to scalar; `i` counts the linear layers from 0.
    """
    rule, _ = _signals(model, x, y, loss_fn, key)
    bp, _ = _signals(_backprop(model), x, y, loss_fn, key)
    return _gradient_metrics(rule, bp)


def layer_deltas(
    model: PyTree,
    x: Shaped[Array, "batch ..."],
    y: Shaped[Array, "batch ..."],
    loss_fn: LossFn,
    *,
    key: PRNGKeyArray | None = None,
) -> list[Float[Array, "batch ..."]]:
    """The error signal $\\delta$ each linear layer receives under the model's rule,
    per example.

    $\\delta_{n,i} = \\partial \\ell_n / \\partial a_{n,i}$, where $a_{n,i}$ is layer
    $i$'s output (before the activation) on example $n$ and the derivative is the
    one the rule computes (through feedback matrices instead of $W^\\top$). It is
    measured with a zero probe $p_{n,i}$ added to each layer's output, $a_{n,i} +
    p_{n,i}$, by differentiating with respect to the probes.

    **Arguments:**

    - `model`: the model, called per example as `model(x, key=key)`.
    - `x`, `y`: a batch of inputs and targets.
    - `loss_fn`: the loss of one example, `loss_fn(output, target) -> scalar`.
    - `key`: passed to the model.

    **Returns:**

    One array of shape `(batch, *output_shape)` per linear layer, in pytree order.
    """
    return _signals(model, x, y, loss_fn, key)[1]


def delta_alignment(
    model: PyTree,
    x: Shaped[Array, "batch ..."],
    y: Shaped[Array, "batch ..."],
    loss_fn: LossFn,
    *,
    key: PRNGKeyArray | None = None,
) -> dict[str, Float[Array, ""]]:
    """The angle between the rule's error signal and backprop's, per layer
    (Akrout et al. 2019).

    With $\\delta_i \\in \\mathbb{R}^{N \\times d_i}$ the rule's per-example errors at
    layer $i$'s output (see [`bioflax_eqx.layer_deltas`][]) and
    $\\delta_i^{\\mathrm{BP}}$ backprop's at the same parameters:

    - `delta_angle/i`: $\\angle(\\delta_i, \\delta_i^{\\mathrm{BP}})$, both matrices
        flattened over the batch;
    - `delta_angle/global`: the angle between all layers' errors concatenated.

    The last layer's error is the output error under every rule (0°).

    **Arguments:**

    - `model`: the model, called per example as `model(x, key=key)`.
    - `x`, `y`: a batch of inputs and targets.
    - `loss_fn`: the loss of one example, `loss_fn(output, target) -> scalar`.
    - `key`: passed to the model; needed by rules that draw feedback (brSF).

    **Returns:**

    A dict from metric name to scalar; `i` counts the linear layers from 0.
    """
    _, rule = _signals(model, x, y, loss_fn, key)
    _, bp = _signals(_backprop(model), x, y, loss_fn, key)
    return _delta_metrics(rule, bp)


def alignment_metrics(
    model: PyTree,
    x: Shaped[Array, "batch ..."],
    y: Shaped[Array, "batch ..."],
    loss_fn: LossFn,
    *,
    key: PRNGKeyArray | None = None,
) -> dict[str, Float[Array, ""]]:
    """Every alignment metric at once: [`bioflax_eqx.gradient_alignment`][],
    [`bioflax_eqx.delta_alignment`][] and [`bioflax_eqx.weight_alignment`][].

    One backward pass per model computes the gradients and errors together. Wrap it
    in `eqx.filter_jit` to compute everything in one compiled call.

    **Arguments:**

    - `model`: the model, called per example as `model(x, key=key)`.
    - `x`, `y`: a batch of inputs and targets.
    - `loss_fn`: the loss of one example, `loss_fn(output, target) -> scalar`.
    - `key`: passed to the model; needed by rules that draw feedback (brSF).

    **Returns:**

    A dict from metric name (e.g. `grad_angle/0`, `delta_angle/global`,
    `weight_angle/1`) to scalar.
    """
    rule_grads, rule_deltas = _signals(model, x, y, loss_fn, key)
    bp_grads, bp_deltas = _signals(_backprop(model), x, y, loss_fn, key)
    return {
        **_gradient_metrics(rule_grads, bp_grads),
        **_delta_metrics(rule_deltas, bp_deltas),
        **weight_alignment(model),
    }
