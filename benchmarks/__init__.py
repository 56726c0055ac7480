"""The benchmarks, a package run from the repository root: `python -m
benchmarks.run_all` (every script, one report: `results.md`), or one script,
`python -m benchmarks.mlp`, `benchmarks.conv`, `benchmarks.cifar`, `benchmarks.cli`,
`benchmarks.devices`. They time the library's own models, losses and epochs
(`bfx.lenet`, `bfx.vgg`, `bfx.resnet20`, `bfx.cross_entropy`, `bfx.train_epoch`, the
`bioflax-eqx` command) against backprop and, where PyTorch is installed, against the
same networks in PyTorch (`_torch.py`, `_torch_cifar.py`, `_torch_cli.py`)."""
