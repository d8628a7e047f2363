"""V-Net (Milletari, Navab, Ahmadi 2016, arXiv 1606.04797) as a plain Flax module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vi_seg_jax.backbones.blocks import (
    DEFAULT_CONV,
    Backbone,
    Upsample,
    conv1,
    conv3,
    instance_norm,
    upsample2x,
)
from vi_seg_jax.ops.conv3d import ConvEngine

# The PReLU slope's initial value in PyTorch (and so in the common V-Net ports).
_PRELU_INIT = 0.25


def _num_convs(level: int) -> int:
    """Convs in the stage at `level` (0 = full resolution): 1, 2, then 3 (Milletari Fig. 1)."""
    return min(level + 1, 3)


class _Stage(nn.Module):
    """One V-Net stage: optional entry (input / 2×2 stride-2 down / ×2 up + skip concat),
    `num_convs` units conv → instance norm → PReLU (→ dropout), residual sum, PReLU.

    Submodules: entry `down` (2×2(×2) stride-2 conv, `entry="down"`), `upsample`
    (`entry="up"`, see `blocks.upsample2x`) or `shortcut` (`entry="input"`, a 1×1(×1) conv,
    only when the input's channels differ from `features`), with `prelu_entry` after
    `down`/`upsample`; then `conv_k`, `prelu_k` for `k = 1..num_convs` and `prelu_out`
    (instance norm is a parameter-free function).

    Attributes:
      features: channels of the entry conv's output; the convs are `features` wide, or
        `2 * features` for `entry="up"` (upsampled input concatenated with the skip).
    """

    features: int
    num_convs: int
    spatial_dims: int
    entry: str  # "input", "down" or "up"
    upsample: Upsample = "transpose"
    dropout_rate: float = 0.0
    dtype: Any = None
    conv: ConvEngine = DEFAULT_CONV

    def _act(self, x: jax.Array, name: str, train: bool) -> jax.Array:
        x = nn.PReLU(negative_slope_init=_PRELU_INIT, name=f"prelu_{name}")(x)
        return nn.Dropout(self.dropout_rate, name=f"dropout_{name}")(x, deterministic=not train)

    @nn.compact
    def __call__(
        self, x: jax.Array, skip: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        d, dt = self.spatial_dims, self.dtype
        if self.entry == "down":
            x = nn.Conv(
                self.features,
                kernel_size=(2,) * d,
                strides=(2,) * d,
                padding="VALID",
                use_bias=False,
                dtype=dt,
                conv_general_dilated=self.conv,
                name="down",
            )(x)
            x = self._act(instance_norm(x), "entry", train)
            residual = x
        elif self.entry == "up":
            x = upsample2x(
                x,
                features=self.features,
                mode=self.upsample,
                spatial_dims=d,
                name="upsample",
                dtype=dt,
                conv=self.conv,
            )
            x = self._act(instance_norm(x), "entry", train)
            if skip is None:
                raise ValueError("an up stage needs the skip connection of its level")
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            residual = x
        else:
            if x.shape[-1] != self.features:
                residual = conv1(self.features, d, name="shortcut", dtype=dt, conv=self.conv)(x)
            else:
                residual = x
        width = residual.shape[-1]
        h = x
        for k in range(1, self.num_convs + 1):
            h = conv3(width, d, name=f"conv_{k}", dtype=dt, conv=self.conv)(h)
            h = self._act(instance_norm(h), str(k), train)
        out = h + residual.astype(h.dtype)
        return nn.PReLU(negative_slope_init=_PRELU_INIT, name="prelu_out")(out)


class VNet(Backbone):
    """V-Net (Milletari et al. 2016) with instance norm and 3×3(×3) kernels.

    Layout for `features = (f_0, ..., f_L)` (depth `L = len(features) - 1`; default
    `(16, 32, 64, 128, 256)`, `L = 4`, the paper's widths):

    - `init`: the input stage at full resolution, 1 conv `C_in → f_0`, residual with the
      input (a 1×1(×1) `shortcut` conv when `C_in != f_0`; the paper broadcast the
      one-channel input to 16 channels).
    - `down_l`, `l = 1..L-1`: a 2×2(×2) stride-2 conv `f_{l-1} → f_l` (the paper's
      "down-convolution"), then `min(l + 1, 3)` convs at `f_l` and a residual sum.
    - `bottleneck`: the same at level `L` with `min(L + 1, 3)` convs (the paper's
      256-channel stage with 3 convs).
    - `up_k`, `k = 1..L`, back to level `l = L - k`: ×2 upsampling to `f_l` channels,
      concatenated with the skip of level `l` (`2 f_l` channels), then `min(l + 1, 3)` convs
      at `2 f_l` and a residual sum with the concatenation. Conv counts: down 1, 2, 3, 3,
      bottom 3, up 3, 3, 2, 1 at the default depth, as in the paper.
    - `head`: 1×1(×1) conv `2 f_0 → num_classes` with a bias.

    Every conv unit is conv → instance norm (no affine, replacing the paper's BatchNorm) →
    PReLU (one learned slope per unit, initialised to 0.25); each stage ends with PReLU
    after its residual sum (post-activation, as in the common PyTorch ports).

    Deviation: the paper's 5×5×5 convolutions are 3×3(×3) here, so that the deep weight
    prior (a VAE over 3×3×3 kernel slices, method.md §4) and the default "every 3×3 conv is
    Bayesian" rule apply to every V-Net conv as they do to the U-Net. The 2×2(×2)
    down-convolutions, the upsampling convs and the 1×1(×1) convs stay deterministic by
    default. 3×3 convs have no bias (they are followed by instance norm, which would
    cancel it).

    Upsampling: `upsample="transpose"` (default, the paper's 2×2×2 stride-2
    de-convolution, written as an equivalent 1×1(×1) conv + depth-to-space) or `"resize"`
    (1×1(×1) conv + linear resize); see `blocks.upsample2x`.

    Input-size rule: every spatial size a multiple of `2**depth`, 16 with the default
    `features` (see `Backbone`).

    Attributes: those of `Backbone`, with five levels of `features` by default (the
    paper's widths); `dropout_rate` applies after every PReLU inside the stages.
    """

    features: Sequence[int] = (16, 32, 64, 128, 256)

    @nn.compact
    def _segment(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The layers; `aux["pre_logits"]` is the last up stage's output, `[B, *S, 2 f_0]`."""
        d, f, depth = self.spatial_dims, self.features, self.depth
        stage = dict(
            spatial_dims=d,
            upsample=self.upsample,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            conv=self.conv,
        )
        x = _Stage(f[0], _num_convs(0), entry="input", name="init", **stage)(x, train=train)
        skips = [x]
        for level in range(1, depth):
            x = _Stage(f[level], _num_convs(level), entry="down", name=f"down_{level}", **stage)(
                x, train=train
            )
            skips.append(x)
        x = _Stage(f[depth], _num_convs(depth), entry="down", name="bottleneck", **stage)(
            x, train=train
        )
        bottleneck = x
        for k, level in enumerate(range(depth - 1, -1, -1), start=1):
            x = _Stage(f[level], _num_convs(level), entry="up", name=f"up_{k}", **stage)(
                x, skips[level], train=train
            )
        logits = conv1(
            self.num_classes, d, use_bias=True, name="head", dtype=self.dtype, conv=self.conv
        )(x)
        return logits, {"bottleneck": bottleneck, "pre_logits": x}
