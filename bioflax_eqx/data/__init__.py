"""Data: MNIST-format IDX files, CIFAR-10, character-level text corpora, synthetic
regression tasks, batching and image augmentation.

Everything a training run consumes comes out of here as JAX arrays, and every random
choice (validation split, synthetic inputs, batch order) is drawn from an explicit
key, so a run is a pure function of its seed. The public names are also exported by
`bioflax_eqx` itself (`bfx.load_dataset`, `bfx.Dataset`, ...).
"""

from ._batches import augment_images as augment_images, epoch_batches as epoch_batches
from ._dataset import (
    DataNotFoundError as DataNotFoundError,
    Dataset as Dataset,
    Split as Split,
)
from ._download import (
    DATA_ENV_VAR as DATA_ENV_VAR,
    resolve_data_dir as resolve_data_dir,
)
from ._idx import read_idx as read_idx
from ._load import (
    IMAGE_SHAPES as IMAGE_SHAPES,
    IMAGE_SIZES as IMAGE_SIZES,
    load_dataset as load_dataset,
)
from ._synthetic import sine as sine, teacher_student as teacher_student
from ._text import (
    TEXT_DATASETS as TEXT_DATASETS,
    TextCorpus as TextCorpus,
    epoch_windows as epoch_windows,
    eval_windows as eval_windows,
    load_text as load_text,
)
