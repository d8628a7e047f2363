"""Whole-volume inference: Gaussian-weighted sliding windows (method.md §6).

A volume larger than the network's window is covered by overlapping tiles; each tile's
output is weighted by a Gaussian centred on the tile (borders of a tile see less context,
so they count less) and the weighted outputs are averaged per voxel, as in nnU-Net and
MONAI. Tile origins are static (NumPy), so one compiled function serves every volume of a
shape; tiles are evaluated `tile_batch` at a time inside `lax.scan` and accumulated in
place, so memory is one output volume plus one batch of tiles.

`volume_sample_fn` turns a per-batch posterior sample (`uncertainty.SampleFn`) into a
per-volume one: every tile of a volume is evaluated by the same network (a sample is one
network, drawn from the same key), and `uncertainty.posterior_predictive` reduces T such
volumes into the predictive maps.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vi_seg_jax.uncertainty import SampleFn

# tiles [n, *window, C] -> per-voxel outputs [n, *window, K]
TileFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    """Sliding-window settings.

    Attributes:
      window: tile size per spatial axis (each a multiple of the backbone's 2**depth).
      overlap: fraction of a tile shared with its neighbour along each axis, in [0, 1).
      sigma_scale: Gaussian standard deviation as a fraction of the tile size.
      tile_batch: tiles evaluated together.
    """

    window: tuple[int, ...] = (96, 96, 96)
    overlap: float = 0.25
    sigma_scale: float = 0.125
    tile_batch: int = 1

    def __post_init__(self):
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.tile_batch < 1 or min(self.window) < 1:
            raise ValueError("window sizes and tile_batch must be >= 1")
        if self.sigma_scale <= 0:
            raise ValueError(f"sigma_scale must be > 0, got {self.sigma_scale}")


def window_origins(shape: Sequence[int], window: Sequence[int], overlap: float) -> np.ndarray:
    """Tile origins [n, D] covering `shape` (each axis at least the window) with `overlap`.

    Along each axis the tiles are spread evenly from 0 to `size − window` with a step of at
    most `window × (1 − overlap)`, so the last tile ends on the border.
    """
    per_axis = []
    for size, win in zip(shape, window, strict=True):
        if size < win:
            raise ValueError(f"volume size {size} is smaller than the window {win}")
        step = max(int(win * (1.0 - overlap)), 1)
        count = -(-(size - win) // step) + 1
        per_axis.append(np.round(np.linspace(0, size - win, count)).astype(np.int32))
    return np.array(list(itertools.product(*per_axis)), dtype=np.int32).reshape(-1, len(shape))


def gaussian_weights(window: Sequence[int], sigma_scale: float) -> np.ndarray:
    """Per-voxel tile weight: a Gaussian centred on the tile, maximum 1, never 0."""
    axes = []
    for win in window:
        centre = (win - 1) / 2.0
        sigma = max(win * sigma_scale, 1e-3)
        axes.append(np.exp(-0.5 * ((np.arange(win) - centre) / sigma) ** 2))
    weights = axes[0]
    for axis in axes[1:]:
        weights = np.multiply.outer(weights, axis)
    weights = weights / weights.max()
    # Far corners underflow towards 0; voxels only a corner covers must still get a weight.
    return np.maximum(weights, 1e-3).astype(np.float32)


def _padded_shape(shape: Sequence[int], window: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(s, w) for s, w in zip(shape, window, strict=True))


def sliding_window(tile_fn: TileFn, volume: jax.Array, config: WindowConfig) -> jax.Array:
    """Gaussian-weighted sliding-window output of `tile_fn` over one volume.

    Args:
      tile_fn: tiles [n, *window, C] -> outputs [n, *window, K].
      volume: [*S, C]; axes smaller than the window are zero-padded and cropped back.
      config: window, overlap, Gaussian width, tiles per call.

    Returns:
      [*S, K], the weighted mean of the tiles' outputs at every voxel.
    """
    spatial = tuple(volume.shape[:-1])
    window = tuple(config.window)
    if len(window) != len(spatial):
        raise ValueError(f"window {window} does not match the volume's spatial shape {spatial}")
    padded = _padded_shape(spatial, window)
    volume = jnp.pad(volume, [(0, p - s) for p, s in zip(padded, spatial, strict=True)] + [(0, 0)])
    origins = window_origins(padded, window, config.overlap)
    weights = gaussian_weights(window, config.sigma_scale)
    coverage = _coverage(padded, window, origins, weights)

    # Pad the tile list to whole batches with weight-0 repeats of the first tile.
    num_tiles = len(origins)
    num_batches = -(-num_tiles // config.tile_batch)
    extra = num_batches * config.tile_batch - num_tiles
    tile_weight = np.concatenate([np.ones(num_tiles), np.zeros(extra)]).astype(np.float32)
    origins = np.concatenate([origins, np.repeat(origins[:1], extra, axis=0)])
    origins = origins.reshape(num_batches, config.tile_batch, len(window))
    tile_weight = tile_weight.reshape(num_batches, config.tile_batch)
    channels = volume.shape[-1]
    gaussian = jnp.asarray(weights)[..., None]

    def cut(origin: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(volume, (*origin, 0), (*window, channels))

    def add_batch(total: jax.Array, batch) -> tuple[jax.Array, None]:
        batch_origins, batch_weight = batch
        outputs = tile_fn(jax.vmap(cut)(batch_origins)).astype(jnp.float32)

        def add_tile(total, tile):
            origin, output, weight = tile
            start = (*origin, 0)
            current = jax.lax.dynamic_slice(total, start, output.shape)
            return jax.lax.dynamic_update_slice(
                total, current + weight * gaussian * output, start
            ), None

        total, _ = jax.lax.scan(add_tile, total, (batch_origins, outputs, batch_weight))
        return total, None

    out_shape = jax.eval_shape(tile_fn, jax.ShapeDtypeStruct((1, *window, channels), volume.dtype))
    total = jnp.zeros((*padded, out_shape.shape[-1]), jnp.float32)
    total, _ = jax.lax.scan(add_batch, total, (jnp.asarray(origins), jnp.asarray(tile_weight)))
    mean = total / jnp.asarray(coverage)[..., None]
    return mean[tuple(slice(0, s) for s in spatial)]


def _coverage(
    shape: Sequence[int], window: Sequence[int], origins: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Σ of the tiles' Gaussian weights at every voxel (static, NumPy)."""
    coverage = np.zeros(shape, np.float32)
    for origin in origins:
        coverage[tuple(slice(o, o + w) for o, w in zip(origin, window, strict=True))] += weights
    return coverage


def volume_sample_fn(sample_fn: SampleFn, config: WindowConfig, spatial_dims: int = 3) -> SampleFn:
    """Per-volume posterior sample: `(index, key, volume [X, Y, Z, C]) -> [X, Y, Z, K]`.

    Every tile is evaluated by sample `index` drawn from `key`, i.e. one network per
    volume. A 2D backbone (`spatial_dims=2`) needs a window `(wx, wy, 1)`: its tiles are
    axial slices.
    """
    if spatial_dims == 2 and (len(config.window) != 3 or config.window[-1] != 1):
        raise ValueError(f"a 2D backbone needs a window (wx, wy, 1), got {config.window}")

    def sample(index: jax.Array, key: jax.Array, volume: jax.Array) -> jax.Array:
        def tile_fn(tiles: jax.Array) -> jax.Array:
            if spatial_dims == 2:
                return sample_fn(index, key, tiles[..., 0, :])[..., None, :]
            return sample_fn(index, key, tiles)

        return sliding_window(tile_fn, volume, config)

    return sample
