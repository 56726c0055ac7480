"""The configuration of a training run: every field typed, described and checked on
construction (the command line's options are generated from the descriptions)."""

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._checks import (
    ArgumentError,
    check_non_negative_int,
    check_non_negative_number,
    check_positive_int,
    check_positive_number,
)
from .._lowering import CONV_PATHS
from .._registry import RULES
from ..data import IMAGE_SHAPES, IMAGE_SIZES, TEXT_DATASETS
from ..models import PLACEMENTS
from ._fields import (
    ConfigError as ConfigError,
    check_batch_split as check_batch_split,
    check_choice as check_choice,
    check_type,
    field,
    field_type as field_type,
)


DATASETS: tuple[str, ...] = (
    "mnist",
    "fashion_mnist",
    "cifar10",
    "teacher_student",
    "sine",
    *TEXT_DATASETS,
)
MODELS: tuple[str, ...] = (
    "mlp",
    "lenet",
    "vgg",
    "resnet20",
    "transformer",
    "custom",
)
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
AUGMENTS: tuple[str, ...] = ("auto", "none", "shift", "shift-flip")
# Per-example losses; `auto` is cross-entropy for classification, else squared error.
LOSSES: tuple[str, ...] = ("cross_entropy", "sigmoid_cross_entropy", "squared_error")
INITS: tuple[str, ...] = ("default", "akrout")
ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
}

# `width` and `depth` when not given: the MLP's, and the Transformer's (issue #19's
# default, which learns on 2 CPU cores in minutes).
_SIZES = {"mlp": (256, 2), "transformer": (128, 4)}

# The teacher network of `dataset="teacher_student"`: in, out, width, depth.
TEACHER = (32, 4, 64, 2)


# Not instrumented by jaxtyping's import hook (the tests run under it): the fields'
# types are checked by `__post_init__`, which names the field in a `ConfigError`.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; invalid values (of a wrong type too)
    raise a [`ConfigError`][bioflax_eqx.ConfigError] naming the field on
    construction, before any work.

    The defaults train a 784-256-256-10 ReLU MLP on MNIST with Adam (learning rate
    1e-3, batch 64), which passes 90% test accuracy after one epoch with every rule.

    **Fields:**

    - `rule`: one of [`bioflax_eqx.RULES`][]: `bp fa kp wm dfa usf brsf frsf`.
    - `model`: `mlp` (`depth` hidden layers of `width`, on flat inputs), `lenet`
        (LeNet as biotorch benchmarks it: conv 5×5 → 6, pool, conv 5×5 → 16,
        pool, dense 120, 84, out; on CIFAR-10 32 and 64 channels and dense 128),
        `vgg` (a small VGG-style net: 3×3 convolutions
        of 32, 64 and 128 channels, each followed by a 2×2 max pool, then dense
        256, out), `resnet20` (He et al. 2016's CIFAR ResNet-20, with batch norm),
        `transformer` (a decoder-only [`bioflax_eqx.Transformer`][], a character
        language model: it needs a text data set, which needs it), or `custom`
        (the model passed to [`bioflax_eqx.train`][] as `model=`). The conv
        models need an image data set and take images `(C, H, W)`.
    - `dataset`: `mnist`, `fashion_mnist` (IDX files), `cifar10` (the binary
        distribution; see [`bioflax_eqx.load_dataset`][]), `teacher_student`
        (regression on a random tanh teacher, 32 inputs, 4 outputs, two hidden
        layers of 64), `sine` (regression, `y = sin(x)`), or the character
        corpora of [`bioflax_eqx.load_text`][] (90 / 5 / 5 % contiguous splits):
        `shakespeare` (`shakespeare.txt`) or `text` (every `*.txt` of `data_dir`).
    - `data_dir`: the folder holding the data files; `None` uses
        `$BIOFLAX_EQX_DATA` or the cache (downloading there once), for
        `shakespeare` `../shared/data/shakespeare`; `text` needs it.
    - `limit`: read only the first `limit` training and test examples of an image
        data set (for quick checks).
    - `val_size`: training examples held out for validation (chosen by the seed).
    - `n_train`, `n_test`: examples of the synthetic tasks (`val_size` more are drawn
        for validation).
    - `augment`: how training images are augmented, on device in each step
        ([`bioflax_eqx.augment_images`][], seeded): `none`; `shift`, a random crop
        of the image zero-padded by 4 pixels (CIFAR-10) or 2 (the 28×28 sets), i.e.
        a random shift; `shift-flip`, that and a random horizontal flip; or `auto`
        (the default), which becomes `shift-flip` for `cifar10` and `none` for the
        others. Ignored (left `none`) for the synthetic tasks.
    - `width`, `depth`: hidden layer size and number of hidden layers (`mlp`;
        default 256 and 2), or the residual stream's width and the number of
        blocks (`transformer`; default 128 and 4).
    - `context`, `heads`: the Transformer's sequence length (the windows it
        trains on) and attention heads per block (dividing `width`).
    - `dfa_placement`: where the Transformer's DFA points go (rule `dfa`):
        `macro` (after each block) or `micro` (after each sub-layer).
    - `activation`: `relu`, `tanh`, `gelu`, `silu` or `sigmoid` (every model), or
        `auto` (the default), which becomes the model's own: `tanh` for `lenet`
        (LeNet-5's squashing units, LeCun et al. 1998; with them FA and DFA pass
        95% on MNIST after one epoch, with ReLU they do not), `relu` otherwise.
    - `loss`: per example, averaged over the batch: `cross_entropy` (softmax),
        `sigmoid_cross_entropy` (a sigmoid binary cross-entropy of every output unit
        against the one-hot label, summed over the units, as Akrout et al. 2019
        train), `squared_error`, or `auto` (the default), which becomes
        `cross_entropy` for classification and `squared_error` for regression.
    - `init`: `default` (Equinox's initialisation, the library's feedback) or
        `akrout` (`mlp` only: every weight, bias and random feedback array drawn
        from `N(0, 1/(fan_in + fan_out))`, as Akrout et al.'s code does; DFA's
        feedback with the output size as its fan-in).
    - `optimizer`: `sgd`, `momentum` (SGD with momentum 0.9), `adam` or `adamw`.
    - `lr`: peak learning rate, > 0.
    - `bias_lr_scale`: the biases' updates are scaled by this (> 0), e.g. `1/128`
        for Akrout et al.'s biases, which learn at `lr / batch_size`.
    - `schedule`: `constant`, or `cosine` decay to 0 over the run.
    - `warmup_epochs`: linear warm-up from 0 over this many epochs first.
    - `weight_decay`: in `[0, 1)`, on weight matrices and Kolen-Pollack's feedback
        ([`bioflax_eqx.decay_mask`][]), never on biases or fixed feedback. Added to
        the gradient before the optimiser (L2) for `sgd`, `momentum` and `adam`;
        decoupled for `adamw`.
    - `batch_size`: examples (for text, windows of `context + 1` characters) per
        step; the last incomplete batch of each epoch is dropped.
    - `shuffle`: draw a new order of the training examples every epoch (seeded);
        `False` takes them in file order every epoch. Text epochs are always
        random windows ([`bioflax_eqx.epoch_windows`][]).
    - `devices`: devices to train on, data-parallel (see the Many devices page):
        each batch is split evenly over this many local devices (of every process
        in a multi-host run), so `batch_size` must be a multiple of it; the
        model, optimiser and batch-norm state are replicated. 1 (default) uses
        one device, as without sharding.
    - `epochs`: epochs to train, >= 1.
    - `seed`: the seed every random choice derives from.
    - `feedback_scale`: scale of the random feedback matrices (see each layer).
    - `mirror_lr`, `mirror_noise`, `mirror_decay`, `mirror_batch`: the weight
        mirror's step (rule `wm` only; see [`bioflax_eqx.mirror`][]), run after every
        optimiser step inside the epoch: learning rate $\\eta_B > 0$, noise scale
        $\\sigma > 0$, decay $\\lambda_B \\ge 0$ and noise vectors per layer and step.
        The defaults make `B` track `W` with a time constant of 200 steps.
        `mirror_steps_before`: mirror steps before training (Akrout et al. run one
        epoch's worth, 468).
    - `metrics_batch`: examples of the fixed batch (the first of the validation
        split, or of the training split without one) for the alignment metrics;
        for text, windows of the validation split (at most as many as it holds).
    - `conv_path`: how the compiled epochs and evaluations compute the model's
        convolutions and tiling max pools: `im2col` (slices, reshapes and one
        `dot`: [`bioflax_eqx.im2col_layers`][]), `xla` (`lax.conv_general_dilated`
        and `lax.reduce_window`, as the Equinox layers do) or `auto` (default):
        `im2col` on CPU for a model with convolutions, `xla` otherwise
        ([`bioflax_eqx.choose_conv_path`][]). The same function and gradients
        either way, up to the order of float sums; on CPU `im2col` is several
        times faster inside the epoch's loop (see `benchmarks/`).
    - `out`: the output folder; `None` writes nothing.
    """

    rule: str = field("fa", "learning rule", RULES)
    model: str = field("mlp", "the network", MODELS)
    dataset: str = field("mnist", "the task", DATASETS)
    data_dir: str | None = field(None, "folder of the data files")
    limit: int | None = field(None, "read only this many train/test images")
    val_size: int = field(5000, "training examples held out")
    n_train: int = field(20_000, "training examples of synthetic tasks")
    n_test: int = field(5000, "test examples of synthetic tasks")
    augment: str = field("auto", "training-image augmentation", AUGMENTS)
    width: int | None = field(
        None, "hidden layer size (mlp: 256) or residual width (transformer: 128)"
    )
    depth: int | None = field(None, "hidden layers (mlp: 2) or blocks (transformer: 4)")
    context: int = field(128, "sequence length (transformer)")
    heads: int = field(4, "attention heads per block (transformer)")
    dfa_placement: str = field(
        "macro", "where the transformer's DFA points go (dfa)", PLACEMENTS
    )
    activation: str = field(
        "auto",
        "hidden activation; auto: tanh for lenet, relu otherwise",
        ("auto", *ACTIVATIONS),
    )
    loss: str = field(
        "auto",
        "per-example loss; auto: cross_entropy (classification), squared_error",
        ("auto", *LOSSES),
    )
    init: str = field("default", "initialisation (akrout: mlp only)", INITS)
    optimizer: str = field("adam", "optimiser", OPTIMIZERS)
    lr: float = field(1e-3, "peak learning rate")
    bias_lr_scale: float = field(1.0, "factor of the biases' updates")
    schedule: str = field("constant", "learning-rate schedule", SCHEDULES)
    warmup_epochs: int = field(0, "linear warm-up epochs")
    weight_decay: float = field(0.0, "weight decay, in [0, 1)")
    batch_size: int = field(64, "examples per step")
    shuffle: bool = field(True, "a new order of the training set every epoch")
    devices: int = field(1, "devices to split each batch over (data parallel)")
    epochs: int = field(10, "epochs to train")
    seed: int = field(0, "seed of every random choice")
    feedback_scale: float = field(1.0, "scale of random feedback")
    mirror_lr: float = field(0.005, "weight mirror learning rate (wm)")
    mirror_noise: float = field(1.0, "weight mirror noise scale (wm)")
    mirror_decay: float = field(1.0, "weight mirror decay of B (wm)")
    mirror_batch: int = field(256, "weight mirror noise vectors (wm)")
    mirror_steps_before: int = field(0, "weight mirror steps before training (wm)")
    metrics_batch: int = field(1000, "examples for alignment metrics")
    conv_path: str = field(
        "auto", "how convolutions are computed (auto: im2col on CPU)", CONV_PATHS
    )
    out: str | None = field(None, "output folder")

    def __post_init__(self):
        self._check_types()
        own_width, own_depth = _SIZES.get(self.model, _SIZES["mlp"])
        if self.width is None:  # resolved here, as `activation` below
            object.__setattr__(self, "width", own_width)
        if self.depth is None:
            object.__setattr__(self, "depth", own_depth)
        if self.activation == "auto":
            # Resolved here, so that config.json and resume see the activation used.
            own = "tanh" if self.model == "lenet" else "relu"
            object.__setattr__(self, "activation", own)
        if self.augment == "auto" or self.dataset not in IMAGE_SIZES:
            own = "shift-flip" if self.dataset == "cifar10" else "none"
            object.__setattr__(self, "augment", own)
        if self.loss == "auto":
            own = "cross_entropy" if self.classification else "squared_error"
            object.__setattr__(self, "loss", own)
        self._check_numbers()
        self._check_data()
        self._check_batch()

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), f.type)
            choices = f.metadata.get("choices")
            if choices is not None:
                check_choice(f.name, getattr(self, f.name), choices)

    def _check_numbers(self) -> None:
        try:
            self._check_signs()
        except ArgumentError as e:
            raise ConfigError(e.name, e.reason) from None
        if not 0 <= self.weight_decay < 1:
            raise ConfigError(
                "weight_decay", f"must be in [0, 1), got {self.weight_decay!r}."
            )
        if self.schedule == "cosine" and self.warmup_epochs >= self.epochs:
            raise ConfigError(
                "warmup_epochs",
                f"must be less than epochs ({self.epochs}) for a cosine schedule, "
                f"got {self.warmup_epochs}.",
            )

    def _check_signs(self) -> None:
        check_positive_int(
            limit=1 if self.limit is None else self.limit,
            n_train=self.n_train,
            n_test=self.n_test,
            width=self.width,
            context=self.context,
            heads=self.heads,
            batch_size=self.batch_size,
            devices=self.devices,
            epochs=self.epochs,
            metrics_batch=self.metrics_batch,
            mirror_batch=self.mirror_batch,
        )
        check_non_negative_int(
            val_size=self.val_size,
            depth=self.depth,
            warmup_epochs=self.warmup_epochs,
            seed=self.seed,
            mirror_steps_before=self.mirror_steps_before,
        )
        check_positive_number(
            lr=self.lr,
            mirror_lr=self.mirror_lr,
            mirror_noise=self.mirror_noise,
            feedback_scale=self.feedback_scale,
            bias_lr_scale=self.bias_lr_scale,
        )
        check_non_negative_number(mirror_decay=self.mirror_decay)

    def _check_text(self) -> None:
        texts = ", ".join(TEXT_DATASETS)
        if self.text != (self.model == "transformer"):
            if self.text:
                raise ConfigError(
                    "model",
                    f"a text data set ({self.dataset}) needs model transformer, "
                    f"got {self.model!r}.",
                )
            raise ConfigError(
                "dataset",
                f"the transformer is a language model: it needs a text data set "
                f"({texts}), got {self.dataset!r}.",
            )
        if self.dataset == "text" and self.data_dir is None:
            raise ConfigError("data_dir", "is needed for dataset text (*.txt files).")
        assert self.width is not None  # resolved on construction
        if self.text and self.width % self.heads:
            raise ConfigError(
                "heads", f"must divide width ({self.width}), got {self.heads}."
            )
        if self.text and self.loss != "cross_entropy":
            raise ConfigError(
                "loss", f"must be cross_entropy for a text data set, got {self.loss!r}."
            )
        if self.text and (self.schedule != "constant" or self.warmup_epochs):
            # Their steps depend on the corpus' length, unknown before it is read.
            raise ConfigError(
                "schedule",
                "must be constant, without warm-up, for a text data set.",
            )

    def _check_data(self) -> None:
        self._check_text()
        images = ", ".join(IMAGE_SIZES)
        conv_net = self.model not in ("mlp", "custom", "transformer")
        if conv_net and self.dataset not in IMAGE_SIZES:
            raise ConfigError(
                "model",
                f"{self.model} is a conv net: it needs an image data set "
                f"({images}), got {self.dataset!r}.",
            )
        if self.limit is not None and self.dataset not in IMAGE_SIZES:
            raise ConfigError("limit", f"applies to {images} only; use n_train.")
        if (self.loss == "squared_error") == self.classification:
            task = "classification" if self.classification else "regression"
            raise ConfigError(
                "loss", f"{self.loss} does not fit {task} ({self.dataset})."
            )
        if self.init == "akrout" and self.model != "mlp":
            raise ConfigError("init", f"akrout is for model mlp, got {self.model!r}.")
        if self.dataset in IMAGE_SIZES:
            available = self.split_sizes[0] + self.val_size
            if self.val_size >= available:
                raise ConfigError(
                    "val_size",
                    f"must be less than the {available} training examples, got "
                    f"{self.val_size}.",
                )

    def _check_batch(self) -> None:
        check_batch_split(self.batch_size, self.devices, f"devices ({self.devices})")
        if self.text:  # checked against the corpus once it is read
            return
        n_train = self.split_sizes[0]
        if self.batch_size > n_train:
            raise ConfigError(
                "batch_size",
                f"must be at most the {n_train} training examples, got "
                f"{self.batch_size}.",
            )

    @property
    def split_sizes(self) -> tuple[int, int, int]:
        """Examples in the training, validation and test splits."""
        if self.dataset in IMAGE_SIZES:
            n_train, n_test = IMAGE_SIZES[self.dataset]
            if self.limit is not None:
                n_train, n_test = min(n_train, self.limit), min(n_test, self.limit)
            return n_train - self.val_size, self.val_size, n_test
        return self.n_train, self.val_size, self.n_test

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch; 0 for a text corpus, whose length is known
        only once it is read (its runs keep a constant learning rate)."""
        if self.text:
            return 0
        return self.split_sizes[0] // self.batch_size

    @property
    def text(self) -> bool:
        """Whether the data set is a character corpus (a language model's)."""
        return self.dataset in TEXT_DATASETS

    @property
    def classification(self) -> bool:
        """Whether the task is classification (else regression); the next
        character of a text is one class of its vocabulary."""
        return self.dataset in IMAGE_SIZES or self.text

    @property
    def augment_pad(self) -> int:
        """Pixels of zero padding of the random shift (0: no shift)."""
        if self.augment == "none":
            return 0
        return 4 if self.dataset == "cifar10" else 2

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "TrainConfig":
        """The inverse of `to_dict`; unknown fields raise a `ConfigError`. Fields
        missing (from a checkpoint of an older version) take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        if isinstance(fields.get("augment"), bool):  # saved when it was a bool
            fields = {**fields, "augment": "auto" if fields["augment"] else "none"}
        for name in fields:
            if name not in known:
                raise ConfigError(name, "is not a TrainConfig field.")
        return cls(**fields)


def io_shapes(config: TrainConfig) -> tuple[tuple[int, ...], int]:
    """One example's input shape as stored (flat) and the output size, known
    without loading the data."""
    if config.dataset in IMAGE_SIZES:
        return (math.prod(IMAGE_SHAPES[config.dataset]),), 10
    if config.dataset == "teacher_student":
        return (TEACHER[0],), TEACHER[1]
    return (1,), 1
