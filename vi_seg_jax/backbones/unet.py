"""The U-Net of the paper's code (`UNet3D` of github AKuzina/DWP), as a plain Flax module."""

from __future__ import annotations

import flax.linen as nn
import jax

from vi_seg_jax.backbones.blocks import Backbone, ResBlock, UpBlock, conv1, conv3


class UNet(Backbone):
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

    Input-size rule: every spatial size a multiple of `2**depth`, 8 with the default
    `features` (see `Backbone`).

    Attributes (besides `Backbone`'s):
      short: drop the three bottleneck blocks.
      upsample: `"transpose"` (the default, a kernel-2 stride-2 transposed conv) or
        `"resize"` (the paper's 1×1 conv + linear upsampling; `jax.image.resize` uses
        half-pixel centres where the paper code used `align_corners=True`). The default is
        the one measured faster forward+backward by `benchmarks/upsampling.py` (2-core CPU):
        the upsampling alone 1.2-1.6× faster; the whole U-Net step within noise (±2%), the
        upsampling being ~1% of it. `"resize"` adds fewer parameters (1×1 convs of
        `c_in * c_out` instead of `2**d * c_in * c_out`) and is the paper's choice.
      dropout_rate: dropout after each activation that feeds a 3×3 conv.
    """

    short: bool = False

    @nn.compact
    def _segment(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The layers; `aux["pre_logits"]` is the last up block's output, `[B, *S, f_0]`."""
        d, f = self.spatial_dims, self.features
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
