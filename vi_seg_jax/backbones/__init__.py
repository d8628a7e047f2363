"""Segmentation backbones: plain, deterministic Flax Linen modules (method.md §2).

Every backbone is one class for 2D and 3D (`spatial_dims` 2 or 3), takes batched
channels-last inputs (`[B, H, W, C]` or `[B, H, W, D, C]`, every spatial size a multiple of
`2**depth`), and is called as `logits, aux = model.apply(variables, x, train=False)` with
`aux = {"bottleneck": ..., "pre_logits": ...}`. Pass `rngs={"dropout": key}` when
`train=True` and `dropout_rate > 0`.

For the variational layer: every convolution is an `nn.Conv` submodule with a stable name;
the 3×3(×3) ones (kernel shape `(3,) * spatial_dims + (c_in, c_out)`) never have a bias;
1×1(×1), 2×2(×2) and upsampling convs are the deterministic part by default. Every conv
computes through the backbone's `conv` attribute (`vi_seg_jax.ops.ConvEngine`, their
`conv_general_dilated`), an exact drop-in for `lax.conv_general_dilated` that rewrites
strided 3D convolutions as stride-1 ones and computes each piece of a 3D conv (forward,
input and kernel gradients) in the formulation measured fastest on the machine.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from vi_seg_jax.backbones.blocks import (
    Backbone,
    ResBlock,
    UpBlock,
    conv1,
    conv3,
    instance_norm,
    upsample2x,
)
from vi_seg_jax.backbones.fcn import FCN
from vi_seg_jax.backbones.unet import UNet
from vi_seg_jax.backbones.vnet import VNet

__all__ = [
    "BACKBONES",
    "FCN",
    "Backbone",
    "ResBlock",
    "UNet",
    "UpBlock",
    "VNet",
    "conv1",
    "conv3",
    "count_params",
    "get_backbone",
    "instance_norm",
    "upsample2x",
]

BACKBONES: dict[str, type[nn.Module]] = {"unet": UNet, "vnet": VNet, "fcn": FCN}


def get_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Builds the backbone registered under `name` (`"unet"`, `"vnet"` or `"fcn"`).

    Args:
      name: a key of `BACKBONES`.
      **kwargs: the class's attributes, e.g. `num_classes=2, spatial_dims=3`.

    Raises:
      ValueError: for an unknown name (the message lists the valid names), or bad
        hyperparameters.
    """
    try:
        cls = BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}"
        ) from None
    return cls(**kwargs)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or `jax.ShapeDtypeStruct`s).

    Works on the output of `jax.eval_shape(model.init, ...)` without allocating anything.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
