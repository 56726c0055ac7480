"""What the compiled gradient contains: no per-example weight gradients, and no
backward chain or unused input cotangent in DFA."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import bioflax_eqx as bfx


BATCH, IN, WIDTH, OUT = 5, 13, 11, 7  # distinct primes, so shapes are unambiguous


def _loss(model, x, t, key):
    y = jax.vmap(lambda xi: model(xi, key=key))(x)
    return jnp.sum((y - t) ** 2)


def _compiled_grad_hlo(model, spec=eqx.is_array) -> str:
    """The compiled gradient of the summed loss with respect to the half of `model`
    selected by `spec`."""
    x = jnp.zeros((BATCH, IN))
    t = jnp.zeros((BATCH, OUT))
    params, static = eqx.partition(model, spec)

    def grad(params, x, t, key):
        return eqx.filter_grad(_loss)(eqx.combine(params, static), x, t, key)

    lowered = jax.jit(grad).lower(params, x, t, jax.random.key(0))
    text = lowered.compile().as_text()
    assert text is not None
    return text


def _per_example_weight_shapes(hlo: str) -> list[str]:
    """Every rank-3 tensor holding a batch of (out, in) or (in, out) matrices."""
    found = []
    for dims in re.findall(r"f(?:32|64)\[(\d+),(\d+),(\d+)\]", hlo):
        sizes = sorted(int(d) for d in dims)
        if BATCH in sizes and len({IN, WIDTH, OUT} & set(sizes)) == 2:
            found.append("x".join(dims))
    return found


@pytest.mark.parametrize("rule", bfx.RULES)
def test_no_per_example_weight_gradient(rule, getkey):
    model = bfx.MLP(IN, OUT, WIDTH, 2, rule=rule, key=getkey())
    assert _per_example_weight_shapes(_compiled_grad_hlo(model)) == []
    # Nor on the trainer's path, which differentiates `bfx.trainable`'s half only.
    trained_half = _compiled_grad_hlo(model, bfx.trainable(model))
    assert _per_example_weight_shapes(trained_half) == []


def test_the_check_catches_a_per_example_backward(getkey):
    # The trap this library avoids: a custom backward returning outer(g, x) per example.
    @jax.custom_vjp
    def matmul(w, x):
        return w @ x

    def fwd(w, x):
        return w @ x, (w, x)

    def bwd(res, g):
        w, x = res
        return jnp.outer(g, x), w.T @ g

    matmul.defvjp(fwd, bwd)  # pyright: ignore[reportFunctionMemberAccess]

    class Naive(eqx.Module):
        w1: jax.Array
        w2: jax.Array

        def __call__(self, x, *, key=None):
            return matmul(self.w2, jnp.tanh(matmul(self.w1, x)))

    model = Naive(jnp.ones((WIDTH, IN)), jnp.ones((OUT, WIDTH)))
    assert _per_example_weight_shapes(_compiled_grad_hlo(model)) != []


def _count_dots(hlo: str) -> int:
    return len(re.findall(r"= f(?:32|64)\[[\d,]*\]\{[\d,]*\} dot\(", hlo))


def test_dfa_gradient_has_no_backward_chain(getkey):
    # Backprop for depth d: d+1 forward, d+1 weight-gradient and d chain products.
    # DFA replaces the chain with d products B e and drops nothing else; FA keeps one
    # product per hidden layer too. No Wᵀδ, and no B e for the input layer.
    depth = 3
    bp = bfx.MLP(IN, OUT, WIDTH, depth, rule="bp", key=getkey())
    dfa = bfx.convert(bp, "dfa", key=getkey(), error_features=OUT)
    bp_dots, dfa_dots = (
        _count_dots(_compiled_grad_hlo(bp)),
        _count_dots(_compiled_grad_hlo(dfa)),
    )
    assert bp_dots == 3 * depth + 2
    assert dfa_dots == bp_dots
    # Each hidden layer's B e reads the (BATCH, OUT) error directly.
    hlo = _compiled_grad_hlo(dfa)
    assert (
        len(re.findall(rf"f(?:32|64)\[{BATCH},{WIDTH}\]\{{[\d,]*\}} dot\(", hlo))
        >= depth
    )


@pytest.mark.parametrize("rule", ["fa", "kp", "usf", "frsf", "brsf"])
def test_feedback_rules_cost_what_backprop_costs(rule, getkey):
    # Every rule of the FA family swaps Wᵀδ for Bᵀδ and adds no product: KP's
    # feedback gradient is the weight gradient itself, sign symmetry builds B
    # elementwise.
    depth = 3
    bp = bfx.MLP(IN, OUT, WIDTH, depth, rule="bp", key=getkey())
    model = bfx.convert(bp, rule, key=getkey())
    assert _count_dots(_compiled_grad_hlo(model)) == 3 * depth + 2
    assert _count_dots(_compiled_grad_hlo(model, bfx.trainable(model))) == (
        3 * depth + 2
    )


@pytest.mark.parametrize("rule", ["fa", "kp", "dfa", "usf", "frsf", "brsf"])
def test_no_cotangent_for_the_data(rule, getkey):
    # The input of the first layer needs no gradient: no (batch, IN) product is built.
    model = bfx.MLP(IN, OUT, WIDTH, 2, rule=rule, key=getkey())
    hlo = _compiled_grad_hlo(model)
    assert re.findall(rf"f(?:32|64)\[{BATCH},{IN}\]\{{[\d,]*\}} dot\(", hlo) == []


@pytest.mark.parametrize("rule", [r for r in bfx.RULES if r != "bp"])
def test_the_compiled_program_names_the_rule(rule, getkey):
    # As `eqx.nn.WeightNorm` does: a profile or an HLO dump says which rule ran.
    model = bfx.MLP(IN, OUT, WIDTH, 1, rule=rule, key=getkey())
    hlo = _compiled_grad_hlo(model)
    assert re.search(rf'op_name="[^"]*\bbfx\.{rule.upper()}\b', hlo)
