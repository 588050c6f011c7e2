"""Patch embeddings as one matrix product.

Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) embed their patches with a `Conv3d` whose kernel equals its
stride and equals the input: each input is exactly one patch [N, C, t, p, p], so the convolution is the product of
the flattened patches [N, C*t*p*p] with the flattened kernel [embed, C*t*p*p]. On CPU oneDNN's Conv3d runs that
product (and above all its weight gradient) several times slower than a plain `linear` (measured on the `small`
model's 8192 x 1176 patches, 1 thread: forward + backward 0.35 s as Conv3d, 0.08 s as linear); the values are the
same product, equal to float rounding (tests/test_packing.py checks outputs and gradients).

`install(model)` replaces the forward of every such convolution (only the forward: the parameters, their names,
hooks that engines put on the module, saving and PEFT wrapping are untouched); an input that is not one patch per
row falls back to the convolution.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F


def _one_patch_forward(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 5 or tuple(x.shape[2:]) != tuple(self.kernel_size):
        return nn.Conv3d.forward(self, x)
    out = F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
    return out.view(x.shape[0], self.out_channels, 1, 1, 1)


def _eligible(module: nn.Module) -> bool:
    return (type(module) is nn.Conv3d and tuple(module.stride) == tuple(module.kernel_size)
            and tuple(module.padding) == (0, 0, 0) and tuple(module.dilation) == (1, 1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def install(model: nn.Module) -> int:
    """Switch the model's one-patch Conv3d layers to the matrix product (module docstring); returns how many."""
    count = 0
    for module in model.modules():
        if _eligible(module) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_one_patch_forward, module)
            count += 1
    return count
