"""The U-Net of the paper's code (`UNet3D` of github AKuzina/DWP), as a plain Flax module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from vi_seg_jax.backbones._blocks import (
    DEFAULT_CONV,
    ResBlock,
    UpBlock,
    Upsample,
    check_hyperparameters,
    check_input,
    conv1,
    conv3,
)
from vi_seg_jax.ops.conv3d import ConvEngine


class UNet(nn.Module):
    """Residual pre-activation U-Net of the paper code (Kuzina et al. 2019; Sagar 2020).

    Layout for `features = (f_0, ..., f_L)` (depth `L = len(features) - 1`; the paper:
    `(16, 32, 64, 128)`, `L = 3`):

    - `init`: 3×3(×3) conv, input channels → `f_0`, at full resolution (no norm before it).
    - `down_{2l-1}`, `down_{2l}` for `l = 1..L`: a stride-2 `ResBlock` `f_{l-1} → f_l`
      (strided first conv, 1×1 stride-2 pre-activated shortcut) and a non-downsampling
      `ResBlock` `f_l → f_l` (identity shortcut). Numbered like the paper's `down1..down6`.
    - `bottleneck_1..3`: three more `ResBlock`s `f_L → f_L` (the paper's `down7..down9`);
      absent when `short=True`.
    - `up_k` for `k = 1..L`: `UpBlock`s back to `f_{L-k}` channels, each adding the skip of
      that level (the output of `init` for the last one, else of `down_{2l}`).
    - `head`: 1×1(×1) conv `f_0 → num_classes`, applied to the last up block's output
      without a norm before it, no bias (as in the paper code).

    No conv has a bias: the network has no biases at all, as in the paper code. Every conv
    but `init` and `head` is preceded by instance norm (no affine) → ReLU (pre-activation);
    the 1×1(×1) shortcut and upsampling convs read the same pre-activation as the 3×3 conv
    beside them.

    The paper's "short" variant is `UNet(..., short=True, features=(16, 32, 32, 64))`
    (`short` only drops the bottleneck blocks, as the code's `shorten` flag did; the channels
    were passed separately there too).

    Input-size rule: `x` is `[B, H, W, C]` (`spatial_dims=2`) or `[B, H, W, D, C]`
    (`spatial_dims=3`), and every spatial size must be a multiple of `2**depth`
    (`2**(len(features) - 1)`, i.e. 8 by default); otherwise `__call__` raises `ValueError`.

    Attributes:
      num_classes: output channels (logits).
      spatial_dims: 2 or 3; kernels are `(3,) * spatial_dims`.
      features: channels per resolution level, at least 2 entries.
      short: drop the three bottleneck blocks.
      upsample: `"transpose"` (default: a kernel-2 stride-2 transposed conv written as a 1×1
        conv + depth-to-space) or `"resize"` (the paper's 1×1 conv + linear upsampling;
        `jax.image.resize` uses half-pixel centres where the paper code used
        `align_corners=True`). See `_blocks.upsample2x`. The default is the one measured
        faster forward+backward by `benchmarks/upsampling.py` (2-core CPU): the upsampling
        alone 1.2-1.6× faster; the whole U-Net step within noise (±2%), the upsampling
        being ~1% of it. `"resize"` adds fewer parameters (1×1 convs of `c_in * c_out`
        instead of `2**d * c_in * c_out`) and is the paper's choice.
      dropout_rate: dropout after each activation that feeds a 3×3 conv (rng stream
        `"dropout"`, only when `train=True`; MC dropout calls with `train=True`).
      dtype: computation dtype of the convolutions (None: inferred), e.g. `jnp.bfloat16`.
      conv: how the 3D convolutions are computed, a `vi_seg_jax.ops.ConvEngine` (default
        `"auto"`: each conv's formulation measured fastest on this machine).
    """

    num_classes: int
    spatial_dims: int = 3
    features: Sequence[int] = (16, 32, 64, 128)
    short: bool = False
    upsample: Upsample = "transpose"
    dropout_rate: float = 0.0
    dtype: Any = None
    conv: ConvEngine = DEFAULT_CONV

    def __post_init__(self) -> None:
        features = check_hyperparameters(
            type(self).__name__,
            spatial_dims=self.spatial_dims,
            features=self.features,
            num_classes=self.num_classes,
            dropout_rate=self.dropout_rate,
            upsample=self.upsample,
            min_levels=2,
        )
        object.__setattr__(self, "features", features)
        super().__post_init__()

    @property
    def depth(self) -> int:
        """Number of stride-2 stages; spatial sizes must be multiples of `2**depth`."""
        return len(self.features) - 1

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Segments a batch.

        Args:
          x: `[B, H, W, C]` or `[B, H, W, D, C]`, spatial sizes multiples of `2**depth`.
          train: enables dropout (needs a `"dropout"` rng when `dropout_rate > 0`).

        Returns:
          `(logits, aux)`: logits `[B, H, W, (D,) num_classes]`; aux `{"bottleneck":
          [B, *(S / 2**depth), f_L], "pre_logits": [B, *S, f_0]}`.
        """
        d, f = self.spatial_dims, self.features
        check_input(type(self).__name__, x, spatial_dims=d, depth=self.depth)
        block = dict(
            spatial_dims=d, dropout_rate=self.dropout_rate, dtype=self.dtype, conv=self.conv
        )

        x = conv3(f[0], d, name="init", dtype=self.dtype, conv=self.conv)(x)
        skips = [x]
        for level in range(1, self.depth + 1):
            x = ResBlock(f[level], strides=2, name=f"down_{2 * level - 1}", **block)(x, train=train)
            x = ResBlock(f[level], name=f"down_{2 * level}", **block)(x, train=train)
            skips.append(x)
        if not self.short:
            for j in range(1, 4):
                x = ResBlock(f[-1], name=f"bottleneck_{j}", **block)(x, train=train)
        bottleneck = x
        for k, level in enumerate(range(self.depth - 1, -1, -1), start=1):
            x = UpBlock(f[level], upsample=self.upsample, name=f"up_{k}", **block)(
                x, skips[level], train=train
            )
        logits = conv1(self.num_classes, d, name="head", dtype=self.dtype, conv=self.conv)(x)
        return logits, {"bottleneck": bottleneck, "pre_logits": x}
