"""The PyTorch side of the benchmarks: MLPs and LeNet-5 with backprop or with
feedback-alignment layers written as biotorch writes them (a
`torch.autograd.Function` whose backward sends the input cotangent through a fixed
random `B` instead of `W`; written here, not copied). Imported only when PyTorch
is installed (`.venv-bench`, see `run_all.py`)."""

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


LR = 1e-3


def available(disabled: bool = False) -> bool:
    if disabled:
        return False
    try:
        import torch  # pyright: ignore[reportMissingImports]  # noqa: F401
    except ImportError:
        return False
    return True


def info() -> dict[str, str]:
    import torch  # pyright: ignore[reportMissingImports]

    torch.set_num_threads(os.cpu_count() or 1)
    return {
        "PyTorch": torch.__version__,
        "torch threads (intra-op / inter-op)": (
            f"{torch.get_num_threads()} / {torch.get_num_interop_threads()}"
        ),
    }


def _fa_layers():
    import torch  # pyright: ignore[reportMissingImports]
    from torch.nn import functional as F  # pyright: ignore[reportMissingImports]

    class LinearFA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, feedback, bias):
            ctx.save_for_backward(x, feedback)
            return torch.addmm(bias, x, weight.t())

        @staticmethod
        def backward(ctx, grad):  # pyright: ignore[reportIncompatibleMethodOverride]
            x, feedback = ctx.saved_tensors
            grad_x = grad @ feedback if ctx.needs_input_grad[0] else None
            return grad_x, grad.t() @ x, None, grad.sum(0)

    class Conv2dFA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, feedback, bias, padding):
            ctx.save_for_backward(x, weight, feedback)
            ctx.padding = padding
            return F.conv2d(x, weight, bias, padding=padding)

        @staticmethod
        def backward(ctx, grad):  # pyright: ignore[reportIncompatibleMethodOverride]
            x, weight, feedback = ctx.saved_tensors
            grad_x = None
            pad = ctx.padding
            if ctx.needs_input_grad[0]:
                grad_x = torch.nn.grad.conv2d_input(
                    x.shape, feedback, grad, padding=pad
                )
            grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, padding=pad)
            return grad_x, grad_w, None, grad.sum((0, 2, 3)), None

    def feedback_like(weight):
        # B ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in the weight's layout, fixed.
        bound = 1 / math.sqrt(math.prod(weight.shape[1:]))
        return torch.empty_like(weight).uniform_(-bound, bound)

    class FALinear(torch.nn.Linear):
        def __init__(self, n_in: int, n_out: int):
            super().__init__(n_in, n_out)
            self.register_buffer("feedback", feedback_like(self.weight.detach()))

        def forward(self, x):  # pyright: ignore[reportIncompatibleMethodOverride]
            return LinearFA.apply(x, self.weight, self.feedback, self.bias)

    class FAConv2d(torch.nn.Conv2d):
        def __init__(self, c_in: int, c_out: int, kernel: int, padding: int = 0):
            super().__init__(c_in, c_out, kernel, padding=padding)
            self.register_buffer("feedback", feedback_like(self.weight.detach()))

        def forward(self, x):  # pyright: ignore[reportIncompatibleMethodOverride]
            pad = self.padding[0]  # pyright: ignore[reportIndexIssue]
            return Conv2dFA.apply(x, self.weight, self.feedback, self.bias, pad)

    return FALinear, FAConv2d


def mlp(rule: str, sizes: Sequence[int]):
    import torch  # pyright: ignore[reportMissingImports]

    torch.manual_seed(0)
    linear = torch.nn.Linear if rule == "bp" else _fa_layers()[0]
    layers: list = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def lenet(rule: str):
    """The library's LeNet-5 on MNIST (`bfx.TrainConfig(model="lenet")`): conv 5×5
    → 6 (28×28 padded by 2), tanh, max-pool, conv 5×5 → 16, tanh, max-pool, dense
    120, 84, 10 with tanh."""
    import torch  # pyright: ignore[reportMissingImports]

    torch.manual_seed(0)
    if rule == "bp":
        linear, conv = torch.nn.Linear, torch.nn.Conv2d
    else:
        linear, conv = _fa_layers()
    tanh, pool = torch.nn.Tanh, torch.nn.MaxPool2d
    return torch.nn.Sequential(
        conv(1, 6, 5, padding=2), tanh(), pool(2),
        conv(6, 16, 5), tanh(), pool(2),
        torch.nn.Flatten(),
        linear(400, 120), tanh(), linear(120, 84), tanh(), linear(84, 10),
    )  # fmt: skip


@dataclasses.dataclass
class TorchCase:
    step: Callable[[], Any]
    epoch: Callable[[], Any]


def case(model, x_all, y_all, batch: int) -> TorchCase:
    """One Adam step on the first batch, and a whole shuffled epoch."""
    import torch  # pyright: ignore[reportMissingImports]

    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x_all = torch.from_numpy(np.array(x_all))  # a writable copy
    y_all = torch.from_numpy(np.array(y_all).astype(np.int64))
    x, y = x_all[:batch], y_all[:batch]
    generator = torch.Generator().manual_seed(0)
    steps = x_all.shape[0] // batch

    def train_step(xb, yb):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        return loss

    def epoch():
        order = torch.randperm(x_all.shape[0], generator=generator)
        loss = None
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            loss = train_step(x_all[idx], y_all[idx])
        assert loss is not None
        return loss.item()

    return TorchCase(lambda: train_step(x, y).item(), epoch)


def mlp_case(rule: str, sizes: Sequence[int], x_all, y_all, batch: int) -> TorchCase:
    return case(mlp(rule, sizes), x_all, y_all, batch)


def lenet_case(rule: str, x_all, y_all, batch: int) -> TorchCase:
    return case(lenet(rule), x_all, y_all, batch)


def conv_op(layer, op: str, x):
    """`op` (`"forward"`, `"input gradient"`, `"weight gradient"`) of the Equinox
    2-D convolution `layer` (its weight, bias, stride and padding) in PyTorch, on
    the batch `x` (a JAX array), as a call that runs it once; `None` for any other
    layer (a pool's column stays empty) and for uneven padding, which
    `F.conv2d` does not take."""
    import equinox as eqx
    import torch  # pyright: ignore[reportMissingImports]
    from torch.nn import functional as F  # pyright: ignore[reportMissingImports]
    from torch.nn.grad import (  # pyright: ignore[reportMissingImports]
        conv2d_input,
        conv2d_weight,
    )

    if not isinstance(layer, eqx.nn.Conv2d) or any(
        lo != hi for lo, hi in layer.padding
    ):
        return None
    weight = torch.from_numpy(np.array(layer.weight))
    bias = None if layer.bias is None else torch.from_numpy(np.array(layer.bias))
    bias = None if bias is None else bias.reshape(-1)  # Equinox's is (out, 1, 1)
    xt = torch.from_numpy(np.array(x))
    stride, padding = tuple(layer.stride), tuple(lo for lo, _ in layer.padding)
    out = F.conv2d(xt, weight, bias, stride=stride, padding=padding)
    g = torch.randn_like(out)
    if op == "forward":
        return lambda: F.conv2d(xt, weight, bias, stride=stride, padding=padding)
    if op == "input gradient":
        return lambda: conv2d_input(xt.shape, weight, g, stride=stride, padding=padding)
    return lambda: conv2d_weight(xt, weight.shape, g, stride=stride, padding=padding)
