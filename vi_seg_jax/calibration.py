"""Post-hoc temperature scaling of the predictive probabilities, per tumour region.

Every region (WT for `task="wt"`; WT, TC, ET for `task="regions"`) is a binary event with
a Monte Carlo predictive probability p̄. Temperature scaling maps it to
σ(logit(p̄) / T), with one T > 0 per region fitted on validation cases by minimising the
negative log-likelihood inside the brain mask (Guo et al. 2017, applied to the predictive
mean so the uncertainty maps keep their samples). T > 1 softens over-confident
predictions; T = 1 is the identity. The map is monotone, so segmentations (p̄ > 0.5) are
unchanged.

`calibrate` also reports the validation ECE before and after the temperature, the latter both
in-sample (on the voxels T was fitted on) and held out (each case scored with the T fitted on
the other cases), since an in-sample ECE flatters the fit.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

from vi_seg_jax.metrics import expected_calibration_error
from vi_seg_jax.task import get_task

CALIBRATION_FILE = "calibration.json"
_EPS = 1e-7
# Fitting uses at most this many voxels per region (a seeded random subset).
MAX_FIT_VOXELS = 2_000_000


def region_names(task: str) -> tuple[str, ...]:
    return get_task(task).regions


def region_probabilities(mean: np.ndarray, task: str) -> np.ndarray:
    """Predictive mean [..., K] -> per-region probabilities [..., R]."""
    return get_task(task).region_probabilities(np.asarray(mean, np.float32))


def region_truth(classes: np.ndarray, task: str) -> np.ndarray:
    """Canonical classes [...] -> per-region truth [..., R] (bool)."""
    return get_task(task).region_truth(classes)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def apply_temperature(probs: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """σ(logit(p) / T), T broadcast over the last (region) axis."""
    return _sigmoid(_logit(probs) / np.asarray(temperature)).astype(np.float32)


def _nll(logits: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    # −log σ(z) = softplus(−z), −log(1 − σ(z)) = softplus(z).
    return float(np.mean(np.logaddexp(0.0, np.where(truth, -z, z))))


def fit_temperature(
    probs: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
    seed: int = 0,
) -> float:
    """The T minimising the NLL of σ(logit(p)/T) against `truth` (binary) inside `mask`."""
    probs = np.asarray(probs).reshape(-1)
    truth = np.asarray(truth, bool).reshape(-1)
    if probs.shape != truth.shape:
        raise ValueError(f"probabilities {probs.shape} and truth {truth.shape} differ")
    if mask is not None:
        keep = np.asarray(mask, bool).reshape(-1)
        probs, truth = probs[keep], truth[keep]
    if probs.size == 0:
        raise ValueError("no voxels to fit a temperature on")
    if probs.size > MAX_FIT_VOXELS:
        index = np.random.default_rng(seed).choice(probs.size, MAX_FIT_VOXELS, replace=False)
        probs, truth = probs[index], truth[index]
    logits = _logit(probs)
    result = scipy.optimize.minimize_scalar(
        lambda log_t: _nll(logits, truth, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def fit_region_temperatures(
    probs: list[np.ndarray], truths: list[np.ndarray], masks: list[np.ndarray], task: str
) -> dict[str, float]:
    """One T per region from several cases (per-region probabilities [..., R])."""
    names = region_names(task)
    pooled_p = np.concatenate(
        [p.reshape(-1, len(names))[m.reshape(-1)] for p, m in zip(probs, masks, strict=True)]
    )
    pooled_y = np.concatenate(
        [y.reshape(-1, len(names))[m.reshape(-1)] for y, m in zip(truths, masks, strict=True)]
    )
    return {name: fit_temperature(pooled_p[:, r], pooled_y[:, r]) for r, name in enumerate(names)}


def calibrate(
    probs: list[np.ndarray], truths: list[np.ndarray], masks: list[np.ndarray], task: str
) -> dict[str, dict[str, float | None]]:
    """Per-region temperatures of several cases and the ECE they give, inside the masks.

    Args:
      probs: per case, per-region predictive probabilities [..., R] (`region_probabilities`).
      truths: per case, per-region truth [..., R] (`region_truth`).
      masks: per case, the brain mask [...].
      task: `wt` or `regions`.

    Returns:
      `temperature`, `ece_before`, `ece_after_in_sample` and `ece_after_held_out` (each
      region → value); the held-out ECE pools every case scored with the temperatures fitted
      on the others, None with fewer than two cases.
    """
    names = region_names(task)
    temperature = fit_region_temperatures(probs, truths, masks, task)

    def pooled(region: int, temperatures: list[float] | None) -> float:
        p = [q[..., region][m] for q, m in zip(probs, masks, strict=True)]
        if temperatures is not None:
            p = [apply_temperature(q, t) for q, t in zip(p, temperatures, strict=True)]
        y = [t[..., region][m] for t, m in zip(truths, masks, strict=True)]
        return expected_calibration_error(np.concatenate(p), np.concatenate(y))

    held_out = None
    if len(probs) > 1:
        rest = [[j for j in range(len(probs)) if j != i] for i in range(len(probs))]
        fitted = [
            fit_region_temperatures(
                [probs[j] for j in others],
                [truths[j] for j in others],
                [masks[j] for j in others],
                task,
            )
            for others in rest
        ]
        held_out = {r: pooled(i, [f[r] for f in fitted]) for i, r in enumerate(names)}
    return {
        "temperature": temperature,
        "ece_before": {r: pooled(i, None) for i, r in enumerate(names)},
        "ece_after_in_sample": {
            r: pooled(i, [temperature[r]] * len(probs)) for i, r in enumerate(names)
        },
        "ece_after_held_out": held_out,
    }
