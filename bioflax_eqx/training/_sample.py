"""Text from a trained language model: characters drawn one at a time, each from the
model's next-character distribution given (at most `context` of) those before."""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray

from .._convert import convert
from ..data import TextCorpus
from ..models import Transformer
from ._run import load_run


def sample(
    model: Transformer,
    characters: str | TextCorpus,
    prompt: str,
    length: int,
    *,
    key: PRNGKeyArray,
    temperature: float = 1.0,
) -> str:
    """Continues `prompt` by `length` characters drawn from `model`, autoregressively.

    Each new character is drawn from `softmax(logits / temperature)` at the last
    position of the window of the (at most `context`) characters before it; the
    same `key` gives the same text. The model's rule does not matter: its forward
    pass is backprop's (feedback only changes learning).

    ```python
    result = bfx.load_run("runs/shakespeare-dfa-seed0")
    text = bfx.sample(result.model, result.characters, "ROMEO:", 300,
                      key=jax.random.key(0))
    ```

    **Arguments:**

    - `model`: a [`bioflax_eqx.Transformer`][] trained on the vocabulary of
        `characters`.
    - `characters`: the vocabulary, as `TrainResult.characters` or
        [`bioflax_eqx.TextCorpus`][]`.characters` (id `i + 1` is `characters[i]`,
        id 0 the unknown symbol), or the corpus itself.
    - `prompt`: the text to continue, at least one character; characters outside
        the vocabulary enter as the unknown symbol.
    - `length`: the number of characters to add, >= 0.
    - `key`: draws the characters.
    - `temperature`: > 0; below 1 sharpens the distribution, above 1 flattens it.

    **Returns:**

    `prompt` followed by the `length` characters drawn (the unknown symbol written
    as U+FFFD).
    """
    if isinstance(characters, TextCorpus):
        characters = characters.characters
    # A corpus without text: its `encode` and `decode` need only the characters.
    vocabulary = TextCorpus(
        train=jnp.zeros(0, jnp.int32),
        val=jnp.zeros(0, jnp.int32),
        test=jnp.zeros(0, jnp.int32),
        characters=characters,
        name="vocabulary",
    )
    if len(characters) + 1 != model.vocab_size:
        raise ValueError(
            f"the model predicts {model.vocab_size} ids, but `characters` make a "
            f"vocabulary of {len(characters) + 1} (with the unknown symbol)."
        )
    if not prompt:
        raise ValueError("`prompt` must hold at least one character.")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"`length` must be a non-negative int, got {length!r}.")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    ids = vocabulary.encode(prompt)
    drawn = _draw(convert(model, "bp"), ids, key, length, float(temperature))
    return prompt + vocabulary.decode(drawn[len(prompt) :])


@eqx.filter_jit
def _draw(
    model: Transformer,
    prompt: Int[Array, " prompt"],
    key: PRNGKeyArray,
    length: int,
    temperature: float,
) -> Int[Array, " total"]:
    """`prompt` and `length` ids drawn after it, in one `lax.scan` of fixed-size
    windows (the model is causal: what follows a window's last real position
    does not change its logits)."""
    n0, context = prompt.shape[0], model.context
    total = n0 + length
    # Room for a whole window wherever it starts.
    ids = jnp.zeros(max(total, context), jnp.int32).at[:n0].set(prompt)

    def step(ids, n_and_key):
        n, k = n_and_key  # `n` ids known so far
        start = jnp.maximum(n - context, 0)
        window = jax.lax.dynamic_slice(ids, (start,), (context,))
        logits = model(window)[n - 1 - start]
        token = jax.random.categorical(k, logits / temperature)
        return ids.at[n].set(token.astype(jnp.int32)), None

    steps = (jnp.arange(n0, total), jax.random.split(key, length))
    ids, _ = jax.lax.scan(step, ids, steps)
    return ids[:total]


def sample_run(
    folder: str | pathlib.Path,
    prompt: str,
    length: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
) -> str:
    """[`sample`][bioflax_eqx.sample] from the last checkpoint of a language
    model's run (what `bioflax-eqx sample` prints), with `jax.random.key(seed)`."""
    result = load_run(folder)
    if result.characters is None:
        raise ValueError(
            f"the run in {folder} is not a language model's ({result.config.model} "
            f"on {result.config.dataset}): there is no text to sample."
        )
    with jax.numpy_dtype_promotion("standard"):
        return sample(
            result.model,
            result.characters,
            prompt,
            length,
            key=jax.random.key(seed),
            temperature=temperature,
        )
