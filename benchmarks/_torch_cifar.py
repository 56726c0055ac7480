"""The PyTorch twins of the library's CIFAR conv nets, `bfx.vgg` and `bfx.resnet20`,
with backprop or feedback alignment (written here, not copied). VGG's FA layers are
`_torch._fa_layers()`'s; ResNet-20's convolutions have a stride and no bias, which
those do not take, so FA's conv is this module's own (the same rule: the input
cotangent goes through a fixed random `B` instead of `W`). Imported only when
PyTorch is installed (`cifar.py` imports it then)."""

import math

import torch  # pyright: ignore[reportMissingImports]
from torch import nn  # pyright: ignore[reportMissingImports]
from torch.nn import functional as F  # pyright: ignore[reportMissingImports]
from torch.nn.grad import (  # pyright: ignore[reportMissingImports]
    conv2d_input,
    conv2d_weight,
)

from . import _torch


def vgg(rule: str, classes: int = 10):
    """`bfx.vgg((3, 32, 32), classes)`: three stages of conv 3×3 (padding 1; 32,
    64, 128 channels), ReLU, max-pool 2; then dense 256, ReLU, dense `classes`."""
    torch.manual_seed(0)
    linear, conv = (nn.Linear, nn.Conv2d) if rule == "bp" else _torch._fa_layers()
    layers: list = []
    channels = 3
    for width in (32, 64, 128):
        layers += [conv(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(
        *layers, nn.Flatten(), linear(128 * 4 * 4, 256), nn.ReLU(), linear(256, classes)
    )


class _Conv3x3FA(torch.autograd.Function):
    """A bias-free 3×3 convolution (padding 1) whose input cotangent goes through
    `feedback`; the weight's gradient is backprop's."""

    @staticmethod
    def forward(ctx, x, weight, feedback, stride):
        ctx.save_for_backward(x, feedback)
        ctx.stride = stride
        return F.conv2d(x, weight, stride=stride, padding=1)

    @staticmethod
    def backward(ctx, grad):  # pyright: ignore[reportIncompatibleMethodOverride]
        x, feedback = ctx.saved_tensors
        s, grad_x = ctx.stride, None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(x.shape, feedback, grad, stride=s, padding=1)
        grad_w = conv2d_weight(x, feedback.shape, grad, stride=s, padding=1)
        return grad_x, grad_w, None, None


class _FAConv3x3(nn.Conv2d):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        # B ~ U(±1/sqrt(fan_in)) in the weight's layout, fixed (as `_torch`'s FA).
        bound = 1 / math.sqrt(c_in * 9)
        feedback = torch.empty_like(self.weight.detach()).uniform_(-bound, bound)
        self.register_buffer("feedback", feedback)

    def forward(self, x):  # pyright: ignore[reportIncompatibleMethodOverride]
        stride = self.stride[0]  # pyright: ignore[reportIndexIssue]
        return _Conv3x3FA.apply(x, self.weight, self.feedback, stride)


def _conv3x3(rule: str, c_in: int, c_out: int, stride: int):
    # No bias: the batch norm after it has one (as `bfx.resnet20`).
    if rule == "bp":
        return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    return _FAConv3x3(c_in, c_out, stride)


class _Block(nn.Module):
    """`bfx.ResidualBlock`: conv, BN, ReLU, conv, BN, plus the shortcut, ReLU. The
    shortcut is option A: identity, or every second pixel with zero channels
    appended after the input's (no parameters)."""

    def __init__(self, rule: str, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(rule, c_in, c_out, stride)
        self.norm1 = nn.BatchNorm2d(c_out)  # momentum 0.1, eps 1e-5: bfx's too
        self.conv2 = _conv3x3(rule, c_out, c_out, 1)
        self.norm2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
        return F.relu(h + shortcut)


def resnet20(rule: str, classes: int = 10):
    """`bfx.resnet20((3, 32, 32), classes)`: conv 3×3 → 16, BN, ReLU; three stages
    of three blocks (16, 32, 64 channels; stride 2 at the start of the second and
    third); global average pool; dense `classes`."""
    torch.manual_seed(0)
    linear = nn.Linear if rule == "bp" else _torch._fa_layers()[0]
    layers: list = [_conv3x3(rule, 3, 16, 1), nn.BatchNorm2d(16), nn.ReLU()]
    channels = 16
    for width in (16, 32, 64):
        for i in range(3):
            stride = 2 if i == 0 and width != 16 else 1
            layers.append(_Block(rule, channels, width, stride))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear(channels, classes)]
    return nn.Sequential(*layers)


MODELS = {"vgg": vgg, "resnet20": resnet20}


def epoch_case(name: str, rule: str, x_all, y_all, batch: int) -> _torch.TorchCase:
    """`_torch.case` of the model `name` (train mode: batch statistics)."""
    return _torch.case(MODELS[name](rule), x_all, y_all, batch)
