"""Reference architectures as plain Equinox models (trained by backprop as built;
[`bioflax_eqx.convert`][] gives them a rule): LeNet-5, a small VGG-style net,
ResNet-20 and a decoder-only Transformer. The trainer, the benchmarks and the
experiments all build them from here. The public names are also exported by
`bioflax_eqx` itself (`bfx.lenet`, ...)."""

from ._common import BATCH_AXIS as BATCH_AXIS
from ._lenet import lenet as lenet
from ._resnet import ResidualBlock as ResidualBlock, resnet20 as resnet20
from ._transformer import PLACEMENTS as PLACEMENTS, Transformer as Transformer
from ._vgg import vgg as vgg
