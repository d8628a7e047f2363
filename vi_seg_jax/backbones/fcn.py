"""A fully convolutional network with FCN-8s-style score fusion (Long, Shelhamer, Darrell
2015, arXiv 1411.4038), built from the U-Net's residual blocks, as a plain Flax module."""

from __future__ import annotations

import flax.linen as nn
import jax

from vi_seg_jax.backbones.blocks import (
    Backbone,
    ResBlock,
    conv1,
    conv3,
    instance_norm,
    replicate_init,
    upsample2x,
)


class FCN(Backbone):
    """FCN with scores fused across scales, FCN-8s style (method.md §2).

    Layout for `features = (f_0, ..., f_L)` (depth `L = len(features) - 1`; default
    `(16, 32, 64, 128)`, `L = 3`, so scores come from strides /2, /4, /8):

    - `init`: 3×3(×3) conv `C_in → f_0` at full resolution.
    - `down_{2l-1}`, `down_{2l}`, `l = 1..L`: the U-Net's encoder (a stride-2 `ResBlock`
      `f_{l-1} → f_l`, then a `ResBlock` `f_l → f_l`), the same blocks so the same priors
      apply.
    - `score_l`, `l = 1..L`: instance norm → ReLU → 1×1(×1) conv with a bias, `f_l →
      num_classes`, on the output of `down_{2l}` (stride `2**l`).
    - fusion: `s = score_L`; for `k = 1..L-1`: `s = up_k(s) + score_{L-k}`; then
      `logits = up_L(s)`, the last ×2 to full resolution. With the default depth this is
      FCN-8s's scheme shifted to the strides /8, /4, /2 (FCN-8s fuses /32, /16, /8 of VGG
      and upsamples ×8 at the end); deeper `features` fuse every stride /2 … /2**L.

    `up_k` is a ×2 upsampling of the `num_classes`-channel scores: with
    `upsample="transpose"` (default) a learned kernel-2 stride-2 transposed conv (a
    1×1(×1) conv named `up_k` + depth-to-space) initialised to nearest-neighbour
    replication, the 2×2 analogue of FCN's bilinear-initialised learned deconvolution; with
    `"resize"` a fixed linear resize and no parameters. See `blocks.upsample2x`.

    No 3×3(×3) conv has a bias; the score convs have one. There is no `head` module: the
    fused score map is the classifier output.

    Input-size rule: every spatial size a multiple of `2**depth`, 8 with the default
    `features` (see `Backbone`).

    Attributes: those of `Backbone`; `dropout_rate` applies after each activation that
    feeds a 3×3 conv.
    """

    @nn.compact
    def _segment(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The layers; `aux["pre_logits"]` is the fused score map at stride 2 before the last
        upsampling, `[B, *(S / 2), num_classes]`."""
        d, f, depth, k_cls = self.spatial_dims, self.features, self.depth, self.num_classes
        block = dict(
            spatial_dims=d, dropout_rate=self.dropout_rate, dtype=self.dtype, conv=self.conv
        )

        x = conv3(f[0], d, name="init", dtype=self.dtype, conv=self.conv)(x)
        scores = {}
        for level in range(1, depth + 1):
            x = ResBlock(f[level], strides=2, name=f"down_{2 * level - 1}", **block)(x, train=train)
            x = ResBlock(f[level], name=f"down_{2 * level}", **block)(x, train=train)
            h = nn.relu(instance_norm(x))
            scores[level] = conv1(
                k_cls, d, use_bias=True, name=f"score_{level}", dtype=self.dtype, conv=self.conv
            )(h)
        bottleneck = x

        def up(s: jax.Array, k: int) -> jax.Array:
            return upsample2x(
                s,
                features=None,
                mode=self.upsample,
                spatial_dims=d,
                name=f"up_{k}",
                dtype=self.dtype,
                kernel_init=replicate_init(k_cls, d),
                conv=self.conv,
            )

        s = scores[depth]
        for k in range(1, depth):
            s = up(s, k) + scores[depth - k]
        logits = up(s, depth)
        return logits, {"bottleneck": bottleneck, "pre_logits": s}
