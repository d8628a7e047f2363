"""Blocks and checks shared by the backbones (`unet.py`, `vnet.py`, `fcn.py`).

Every convolution here is an `nn.Conv` submodule with an explicit name, so that a variational
layer can intercept `nn.Conv.__call__` (`flax.linen.intercept_methods`) and pick the Bayesian
convolutions by parameter path or by kernel shape: 3×3(×3) convolutions never have a bias
(their only parameter is `kernel`, shape `(3,) * spatial_dims + (c_in, c_out)`); 1×1(×1)
projection, upsampling and output convolutions (and V-Net's 2×2(×2) strided ones) are the
deterministic part by default (method.md §2).

Normalisation is instance norm without affine parameters (the paper code's
`nn.InstanceNorm3d` defaults, eps 1e-5), a parameter-free function: no BatchNorm, so
nothing mixes statistics across Monte Carlo samples and there is no `batch_stats` collection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vi_seg_jax.ops.conv3d import ConvEngine
from vi_seg_jax.ops.materialize import materialize

Upsample = Literal["resize", "transpose"]
UPSAMPLE_MODES: tuple[str, ...] = ("resize", "transpose")

# How every conv is computed unless a backbone is given another engine (`ConvEngine`).
DEFAULT_CONV = ConvEngine()

# torch.nn.InstanceNorm3d's default epsilon (the paper code's normalisation).
NORM_EPSILON = 1e-5


# --------------------------------------------------------------------------- validation


def check_hyperparameters(
    cls_name: str,
    *,
    spatial_dims: Any,
    features: Any,
    num_classes: Any,
    dropout_rate: Any,
    upsample: Any,
    min_levels: int,
) -> tuple[int, ...]:
    """Validates the hyperparameters every backbone shares; returns `features` as a tuple.

    Raises:
      ValueError: with a message naming the class, the attribute and the offending value.
    """
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"{cls_name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if (
        isinstance(features, str | bytes)
        or not isinstance(features, Sequence)
        or len(features) == 0
        or not all(
            isinstance(f, int | np.integer) and not isinstance(f, bool) and f > 0 for f in features
        )
    ):
        raise ValueError(
            f"{cls_name}: features must be a non-empty sequence of positive ints, got {features!r}"
        )
    if len(features) < min_levels:
        raise ValueError(
            f"{cls_name}: features needs at least {min_levels} entries (one channel count per "
            f"resolution level), got {tuple(features)!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"{cls_name}: num_classes must be an int >= 1, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"{cls_name}: num_classes must be an int >= 1, got {num_classes!r}")
    if (
        isinstance(dropout_rate, bool)
        or not isinstance(dropout_rate, int | float | np.floating)
        or not 0.0 <= dropout_rate < 1.0
    ):
        raise ValueError(f"{cls_name}: dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(
            f"{cls_name}: upsample must be one of {UPSAMPLE_MODES!r}, got {upsample!r}"
        )
    return tuple(int(f) for f in features)


def check_input(cls_name: str, x: jax.Array, *, spatial_dims: int, depth: int) -> None:
    """Checks a batched channels-last input against the backbone's input-size rule.

    The rule: `x.shape == (B, *spatial, C)` with `len(spatial) == spatial_dims` and every
    spatial size a positive multiple of `2**depth`.

    Raises:
      ValueError: wrong rank, or a spatial size that is not a multiple of `2**depth`.
    """
    shape = tuple(x.shape)
    layout = "[B, H, W, C]" if spatial_dims == 2 else "[B, H, W, D, C]"
    if len(shape) != spatial_dims + 2:
        raise ValueError(
            f"{cls_name}: expected a batched channels-last input {layout} of rank "
            f"{spatial_dims + 2} for spatial_dims={spatial_dims}, got shape {shape}"
        )
    multiple = 2**depth
    spatial = shape[1:-1]
    if any(s <= 0 or s % multiple for s in spatial):
        raise ValueError(
            f"{cls_name}: spatial dims must be multiples of 2**depth = {multiple} "
            f"(depth {depth}), got spatial shape {spatial} in input shape {shape}"
        )


# --------------------------------------------------------------------------- layers


def conv3(
    features: int,
    spatial_dims: int,
    *,
    strides: int = 1,
    name: str,
    dtype: Any = None,
    conv: ConvEngine = DEFAULT_CONV,
) -> nn.Conv:
    """A 3×3(×3) convolution, padding 1 on each side, no bias (the paper code's layout).

    Padding 1 (not XLA's "SAME") keeps strided windows centred on the even voxels, aligned
    with the 1×1 stride-2 shortcut, exactly like PyTorch's `padding=1`.
    """
    return nn.Conv(
        features,
        kernel_size=(3,) * spatial_dims,
        strides=(strides,) * spatial_dims,
        padding=((1, 1),) * spatial_dims,
        use_bias=False,
        dtype=dtype,
        conv_general_dilated=conv,
        name=name,
    )


def conv1(
    features: int,
    spatial_dims: int,
    *,
    strides: int = 1,
    use_bias: bool = False,
    name: str,
    dtype: Any = None,
    kernel_init: Any = None,
    conv: ConvEngine = DEFAULT_CONV,
) -> nn.Conv:
    """A 1×1(×1) convolution (projection, shortcut, upsampling or class scores)."""
    return nn.Conv(
        features,
        kernel_size=(1,) * spatial_dims,
        strides=(strides,) * spatial_dims,
        padding="VALID",
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.initializers.lecun_normal() if kernel_init is None else kernel_init,
        conv_general_dilated=conv,
        name=name,
    )


@jax.custom_vjp
def instance_norm(x: jax.Array) -> jax.Array:
    """Instance norm without affine parameters over the spatial axes of `[B, *S, C]`.

    The same normalisation as `nn.InstanceNorm(epsilon=1e-5, use_scale=False,
    use_bias=False)` (tested), written as a function: it has no parameters, and Flax's
    norms cannot take bfloat16 inputs under `jax_numpy_dtype_promotion="strict"` (they
    promote bfloat16 with float32 implicitly). Statistics are computed in float32 (two-pass
    variance) and the result is cast back to `x.dtype`.

    Its backward pass keeps only the result and the per-channel scale: left to autodiff,
    XLA kept both the input and the centred input of every norm (at 128³, 2 × 128 MB each).
    """
    return _normalize(x)[0].astype(x.dtype)


def _normalize(x):
    axes = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    centred = xf - jnp.mean(xf, axis=axes, keepdims=True)
    scale = lax.rsqrt(jnp.mean(jnp.square(centred), axis=axes, keepdims=True) + NORM_EPSILON)
    return centred * scale, scale


def _instance_norm_forward(x):
    normalized, scale = _normalize(x)
    # Written out here: otherwise XLA recomputes it in the backward pass from the input.
    normalized = materialize(normalized)
    return normalized.astype(x.dtype), (normalized, scale)


def _instance_norm_backward(residuals, cotangent):
    normalized, scale = residuals
    axes = tuple(range(1, normalized.ndim - 1))
    g = cotangent.astype(jnp.float32)
    d_centred = scale * (g - normalized * jnp.mean(g * normalized, axis=axes, keepdims=True))
    d_x = d_centred - jnp.mean(d_centred, axis=axes, keepdims=True)
    return (d_x.astype(cotangent.dtype),)  # the output's dtype is the input's


instance_norm.defvjp(_instance_norm_forward, _instance_norm_backward)


def depth_to_space(x: jax.Array, spatial_dims: int) -> jax.Array:
    """`[B, *S, 2**d * C]` → `[B, *(2 * S), C]`; channel index = offset-major, channel-minor.

    The channel axis is read as `(2,) * d + (C,)`: channel `(o_1, ..., o_d, c)` becomes the
    voxel at offset `(o_1, ..., o_d)` inside each 2×2(×2) output cell.
    """
    d = spatial_dims
    b, *spatial, c_all = x.shape
    c = c_all // 2**d
    x = x.reshape(b, *spatial, *(2,) * d, c)
    # axes: 0 batch, 1..d spatial, d+1..2d offsets, 2d+1 channels -> interleave (s_i, o_i).
    perm = [0]
    for i in range(d):
        perm += [1 + i, 1 + d + i]
    perm.append(2 * d + 1)
    x = jnp.transpose(x, perm)
    return x.reshape(b, *(2 * s for s in spatial), c)


def replicate_init(channels: int, spatial_dims: int):
    """Kernel init making a 1×1 conv + `depth_to_space` a nearest-neighbour ×2 upsampling.

    The 2×2(×2) stride-2 analogue of FCN's bilinear-initialised deconvolution: each output
    voxel starts as a copy of its input voxel, and the mapping is then learned.
    """

    def init(key, shape, dtype=jnp.float32):
        del key
        kernel = jnp.tile(jnp.eye(channels, dtype=dtype), (1, 2**spatial_dims))
        return kernel.reshape(shape)

    return init


def upsample2x(
    x: jax.Array,
    *,
    features: int | None,
    mode: Upsample,
    spatial_dims: int,
    name: str,
    dtype: Any = None,
    kernel_init: Any = None,
    conv: ConvEngine = DEFAULT_CONV,
) -> jax.Array:
    """×2 upsampling of `[B, *S, C]` to `[B, *(2 * S), features]`; call inside a compact method.

    Modes:
      `"resize"`: a 1×1 conv named `name` to `features` channels (skipped when `features` is
        None), then `jax.image.resize(..., "linear")`: linear interpolation with half-pixel
        centres and edge replication. The paper code used
        `nn.Upsample(mode="trilinear", align_corners=True)`, which maps corner to corner
        instead; the two differ by a sub-voxel shift. A 1×1 conv commutes with a
        per-channel linear resize, so it runs at the low resolution.
      `"transpose"`: a learned transposed convolution with kernel 2 and stride 2, written as
        the exactly equivalent 1×1 conv named `name` to `2**d * features` channels followed
        by `depth_to_space` (the stride equals the kernel, so windows do not overlap). This
        keeps every convolution an `nn.Conv` and avoids `lax.conv_transpose`, whose 3D
        gradient is slow in XLA (jax issue #31662; 39-64× slower forward+backward here,
        `benchmarks/upsampling.py`). Its kernel has shape `(1,) * d + (C, 2**d * features)`,
        channel `(o_1, ..., o_d, c)` being the tap at offset `o`; it equals
        `nn.ConvTranspose(features, (2,) * d, strides=(2,) * d, padding="VALID")` with
        that module's kernel flipped along the spatial axes (tested).
    """
    d = spatial_dims
    if mode == "resize":
        if features is not None:
            x = conv1(features, d, name=name, dtype=dtype, kernel_init=kernel_init, conv=conv)(x)
        b, *spatial, c = x.shape
        return jax.image.resize(x, (b, *(2 * s for s in spatial), c), method="linear")
    if mode == "transpose":
        out = x.shape[-1] if features is None else features
        x = conv1(out * 2**d, d, name=name, dtype=dtype, kernel_init=kernel_init, conv=conv)(x)
        return depth_to_space(x, d)
    raise ValueError(f"upsample must be one of {UPSAMPLE_MODES!r}, got {mode!r}")


# --------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """The paper code's `BasicDownBlock`: a pre-activation residual block.

    `y = conv_2(drop(relu(norm(conv_1(drop(relu(norm(x))))))))`, returned as `y + s` where
    the shortcut `s` is `x` itself when the block keeps resolution and channels, and
    `shortcut(relu(norm(x)))`, a 1×1(×1) conv with the block's stride, otherwise (the paper
    code's pre-activated `ConvBlock(kernel=1, stride=2)`). `norm` is `instance_norm`.

    Attributes:
      features: output channels.
      spatial_dims: 2 or 3.
      strides: 1, or 2 to halve every spatial size (`conv_1` and `shortcut` are strided).
      dropout_rate: dropout after each activation that feeds a 3×3 conv (rng stream
        `"dropout"`, active only when `train=True`).
      dtype: computation dtype of the convolutions (None: from inputs and parameters).
      conv: how the convolutions are computed (`ConvEngine`).

    Submodules: `conv_1`, `conv_2`, `shortcut` (only when needed).
    """

    features: int
    spatial_dims: int
    strides: int = 1
    dropout_rate: float = 0.0
    dtype: Any = None
    conv: ConvEngine = DEFAULT_CONV

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        d = self.spatial_dims
        h = nn.relu(instance_norm(x))
        y = nn.Dropout(self.dropout_rate, name="dropout_1")(h, deterministic=not train)
        y = conv3(
            self.features, d, strides=self.strides, name="conv_1", dtype=self.dtype, conv=self.conv
        )(y)
        y = nn.relu(instance_norm(y))
        y = nn.Dropout(self.dropout_rate, name="dropout_2")(y, deterministic=not train)
        y = conv3(self.features, d, name="conv_2", dtype=self.dtype, conv=self.conv)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            s = conv1(
                self.features,
                d,
                strides=self.strides,
                name="shortcut",
                dtype=self.dtype,
                conv=self.conv,
            )(h)
        else:
            s = x
        return y + s


class UpBlock(nn.Module):
    """The paper code's `BasicUpBlock`: upsample, add the skip, two pre-activation convs.

    `u = up(relu(norm(x))) + skip`, `y = conv_2(...conv_1(drop(relu(norm(u)))))`,
    returns `y + u`. `up` is `upsample2x` (a 1×1 conv named `upsample` plus resize, or the
    equivalent of a kernel-2 stride-2 transposed conv, see `upsample2x`).

    Attributes:
      features: output channels (also the skip's channels).
      spatial_dims: 2 or 3.
      upsample: `"resize"` or `"transpose"`.
      dropout_rate: as in `ResBlock`.
      dtype: computation dtype of the convolutions.
      conv: how the convolutions are computed (`ConvEngine`).

    Submodules: `upsample`, `conv_1`, `conv_2`.
    """

    features: int
    spatial_dims: int
    upsample: Upsample = "resize"
    dropout_rate: float = 0.0
    dtype: Any = None
    conv: ConvEngine = DEFAULT_CONV

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool = False) -> jax.Array:
        d = self.spatial_dims
        h = nn.relu(instance_norm(x))
        u = upsample2x(
            h,
            features=self.features,
            mode=self.upsample,
            spatial_dims=d,
            name="upsample",
            dtype=self.dtype,
            conv=self.conv,
        )
        u = u + skip.astype(u.dtype)
        y = nn.relu(instance_norm(u))
        y = nn.Dropout(self.dropout_rate, name="dropout_1")(y, deterministic=not train)
        y = conv3(self.features, d, name="conv_1", dtype=self.dtype, conv=self.conv)(y)
        y = nn.relu(instance_norm(y))
        y = nn.Dropout(self.dropout_rate, name="dropout_2")(y, deterministic=not train)
        y = conv3(self.features, d, name="conv_2", dtype=self.dtype, conv=self.conv)(y)
        return y + u


# --------------------------------------------------------------------------- backbone base


class Backbone(nn.Module):
    """What `UNet`, `VNet` and `FCN` share: their common attributes, the validation of those
    at construction, the input-size check and the `(logits, aux)` call contract.

    A backbone subclasses this and writes its layers in `_segment`, an `@nn.compact` method
    that `__call__` runs after checking the input; submodule names (and so parameter paths)
    are those given in `_segment`, with no prefix from this class.

    Input-size rule: `x` is `[B, H, W, C]` (`spatial_dims=2`) or `[B, H, W, D, C]`
    (`spatial_dims=3`), and every spatial size must be a multiple of `2**depth`
    (`2**(len(features) - 1)`); otherwise `__call__` raises `ValueError`.

    Attributes:
      num_classes: output channels (logits).
      spatial_dims: 2 or 3; kernels are `(3,) * spatial_dims`.
      features: channels per resolution level, at least 2 entries.
      upsample: `"transpose"` (a learned kernel-2 stride-2 transposed conv, written as a
        1×1(×1) conv + depth-to-space) or `"resize"` (linear resize); see `upsample2x`.
      dropout_rate: dropout rate (rng stream `"dropout"`, only when `train=True`; MC
        dropout calls with `train=True`); where it applies is the subclass's to say.
      dtype: computation dtype of the convolutions (None: inferred), e.g. `jnp.bfloat16`.
      conv: how the 3D convolutions are computed, a `vi_seg_jax.ops.ConvEngine` (default
        `"auto"`: each conv's formulation measured fastest on this machine).

    Raises:
      ValueError: at construction, for a bad attribute (the message names the class).
    """

    num_classes: int
    spatial_dims: int = 3
    features: Sequence[int] = (16, 32, 64, 128)
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

    def __call__(
        self, x: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Segments a batch.

        Args:
          x: `[B, H, W, C]` or `[B, H, W, D, C]`, spatial sizes multiples of `2**depth`.
          train: enables dropout (needs a `"dropout"` rng when `dropout_rate > 0`).

        Returns:
          `(logits, aux)`: logits `[B, H, W, (D,) num_classes]`; aux `{"bottleneck":
          [B, *(S / 2**depth), f_L], "pre_logits": ...}`, the features the classifier reads
          (their shape: the subclass's `_segment`).

        Raises:
          ValueError: `x` breaks the input-size rule.
        """
        check_input(type(self).__name__, x, spatial_dims=self.spatial_dims, depth=self.depth)
        return self._segment(x, train=train)

    def _segment(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The layers, on an input already checked; an `@nn.compact` method in a subclass."""
        raise NotImplementedError
