"""Equinox layers for learning without weight transport."""

from ._block_pool import BlockMaxPool as BlockMaxPool
from ._channel import (
    close_error_channel as close_error_channel,
    open_error_channel as open_error_channel,
)
from ._convert import AbstractDFAModel as AbstractDFAModel, convert as convert
from ._dfa import DFA as DFA, DFAFeedback as DFAFeedback, Sequential as Sequential
from ._im2col import Im2colConv as Im2colConv, conv_im2col as conv_im2col
from ._lowering import (
    choose_conv_path as choose_conv_path,
    im2col_layers as im2col_layers,
    xla_layers as xla_layers,
)
from ._metrics import (
    alignment_metrics as alignment_metrics,
    angle as angle,
    delta_alignment as delta_alignment,
    gradient_alignment as gradient_alignment,
    layer_deltas as layer_deltas,
    weight_alignment as weight_alignment,
)
from ._mirror import mirror as mirror
from ._mlp import MLP as MLP
from ._optim import (
    decay_mask as decay_mask,
    feedback_labels as feedback_labels,
    freeze_feedback as freeze_feedback,
    tie_feedback as tie_feedback,
    trainable as trainable,
)
from ._registry import RULES as RULES
from ._rules import (
    FA as FA,
    KP as KP,
    WM as WM,
    AbstractFeedback as AbstractFeedback,
    AbstractRule as AbstractRule,
)
from ._sign import BRSF as BRSF, FRSF as FRSF, USF as USF
from .data import (
    DataNotFoundError as DataNotFoundError,
    Dataset as Dataset,
    Split as Split,
    TextCorpus as TextCorpus,
    augment_images as augment_images,
    epoch_batches as epoch_batches,
    epoch_windows as epoch_windows,
    eval_windows as eval_windows,
    load_dataset as load_dataset,
    load_text as load_text,
    sine as sine,
    teacher_student as teacher_student,
)
from .models import (
    ResidualBlock as ResidualBlock,
    Transformer as Transformer,
    lenet as lenet,
    resnet20 as resnet20,
    vgg as vgg,
)
from .training import (
    CheckpointError as CheckpointError,
    ConfigError as ConfigError,
    DivergedError as DivergedError,
    TrainConfig as TrainConfig,
    TrainResult as TrainResult,
    compare as compare,
    cross_entropy as cross_entropy,
    load_run as load_run,
    sample as sample,
    sigmoid_cross_entropy as sigmoid_cross_entropy,
    squared_error as squared_error,
    train as train,
    train_epoch as train_epoch,
    train_epoch_with_state as train_epoch_with_state,
    training_curve as training_curve,
)


__version__ = "0.1.0"
