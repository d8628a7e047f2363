"""Kernel slices of trained networks, grouped by layer, for the deep weight prior (method.md §4).

A k×k(×k) convolution kernel `[*k, C_in, C_out]` holds C_in·C_out slices, one per
(input, output) channel pair; each slice, flattened to D = k^d numbers, is one sample of
the kernel distribution that a per-group VAE learns. Slices with L2 norm ≤ 1e-2 (dead
filters) are dropped, as in the DWP code.

Layer groups (`default_groups`), in the network's forward order:

- U-Net, depth 3 (the paper's): the DWP code's seven groups, `{init, down1.c1}`,
  `{down1.c2 … down3.c1}`, `{down3.c2 … down5.c1}`, `{down5.c2 … bottom}`, `{up1}`, `{up2}`,
  `{up3}` (`down_k/conv_j` here; `down6` and the three bottleneck blocks are "bottom").
- Every other backbone or depth: the encoder's 3×3(×3) convs (input conv, down stages,
  bottleneck) split into four contiguous groups of near-equal size in forward order, and
  one group per decoder stage `up_k` (V-Net; the FCN has no decoder convs). Early layers
  see raw intensities, late ones abstract features: kernels of neighbouring layers share
  statistics, distant ones do not.
"""

from __future__ import annotations

import re

import numpy as np

from vi_seg_jax.bayes.guide import ParamPath

MIN_KERNEL_NORM = 1e-2
_STAGE_RANK = {"init": 0, "down": 1, "bottleneck": 2, "up": 3}


def path_name(path: ParamPath) -> str:
    return "/".join(path)


def _forward_key(path: ParamPath) -> tuple:
    """Sort key placing convs in forward order: init, down_i/conv_j, bottleneck, up_k."""
    stage, *rest = path
    match = re.fullmatch(r"([a-z]+)(?:_(\d+))?", stage)
    if match is None or match.group(1) not in _STAGE_RANK:
        raise ValueError(f"unexpected layer {path_name(path)!r}: not init/down/bottleneck/up")
    numbers = [int(n) for part in rest for n in re.findall(r"\d+", part)]
    return (_STAGE_RANK[match.group(1)], int(match.group(2) or 0), numbers)


def forward_order(paths: tuple[ParamPath, ...]) -> list[ParamPath]:
    return sorted(paths, key=_forward_key)


def _unet_paper_groups(encoder: list[ParamPath]) -> dict[str, list[ParamPath]] | None:
    """The DWP code's encoder groups, for a U-Net of the paper's depth (else None)."""
    names = [path_name(p) for p in encoder]
    boundaries = ["down_1/conv_2/kernel", "down_3/conv_2/kernel", "down_5/conv_2/kernel"]
    if not all(b in names for b in boundaries) or "down_7/conv_1/kernel" in names:
        return None
    cuts = [0] + [names.index(b) for b in boundaries] + [len(encoder)]
    return {f"encoder_{i + 1}": encoder[cuts[i] : cuts[i + 1]] for i in range(4)}


def default_groups(backbone: str, paths: tuple[ParamPath, ...]) -> dict[str, list[ParamPath]]:
    """Layer group name -> Bayesian kernel paths, in forward order (see the module doc)."""
    ordered = forward_order(paths)
    decoder = [p for p in ordered if p[0].startswith("up_")]
    encoder = [p for p in ordered if not p[0].startswith("up_")]
    groups = _unet_paper_groups(encoder) if backbone == "unet" else None
    if groups is None:
        chunks = np.array_split(np.arange(len(encoder)), min(4, len(encoder)))
        groups = {f"encoder_{i + 1}": [encoder[j] for j in c] for i, c in enumerate(chunks)}
    for stage in sorted({p[0] for p in decoder}, key=lambda s: int(s.split("_")[1])):
        groups[stage] = [p for p in decoder if p[0] == stage]
    return groups


def kernel_slices(kernel: np.ndarray) -> np.ndarray:
    """`[*k, C_in, C_out]` -> `[C_in · C_out, k^d]`, one row per channel pair."""
    kernel = np.asarray(kernel)
    spatial = kernel.shape[:-2]
    rows = kernel.reshape(int(np.prod(spatial)), -1)
    return np.ascontiguousarray(rows.T)


def collect_kernels(
    params_list: list[dict], groups: dict[str, list[ParamPath]], min_norm: float = MIN_KERNEL_NORM
) -> dict[str, np.ndarray]:
    """Kernel slices of every network in `params_list`, per group, small ones dropped."""
    collected = {}
    for name, paths in groups.items():
        rows = []
        for params in params_list:
            for path in paths:
                leaf = params
                for part in path:
                    leaf = leaf[part]
                rows.append(kernel_slices(np.asarray(leaf, np.float32)))
        stacked = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        collected[name] = stacked[np.linalg.norm(stacked, axis=1) > min_norm]
    return collected
