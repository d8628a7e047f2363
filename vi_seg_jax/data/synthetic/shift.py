"""Graded distribution shift: what `Shift(kind, level)` changes in a synthetic dataset.

Three kinds, each at levels 0-3 (0 is no shift: the arrays are bitwise today's dataset):

* `scanner`: more noise, a stronger bias field, thicker slices (through-plane blur and
  resampling), a non-linear intensity response (gamma) and a gain outside the usual range.
  Anatomy, tumour and labels are untouched.
* `contrast`: weaker enhancement on T1ce (none at level 3) and lower FLAIR/T2 contrast of
  edema, tumour and lesions against white matter. Anatomy, tumour and labels are untouched.
* `anatomy` (tumour domain only): the tumour leaves the generator's usual range. Each case
  gets one mode, cycling with its index (`anatomy_mode`): `small` (all radii shrunk), `large`
  (all radii grown), `multifocal` (a smaller primary plus `level` separate satellite foci) or
  `location` (the tumour moves: juxtacortical, then cerebellar hemisphere, then brainstem).

The shift's own random draws come from a seventh child of the case's `SeedSequence`, spawned
after the six the generator already uses, so a shifted case has the same brain, the same noise
draws and (except for `anatomy`) the same tumour and labels as its unshifted twin.

The per-level numbers live in the tables below; `docs/shift.md` prints them as a table.
"""

from __future__ import annotations

import dataclasses
import numbers

SHIFT_KINDS = ("scanner", "contrast", "anatomy")
MAX_SHIFT_LEVEL = 3
ANATOMY_MODES = ("small", "large", "multifocal", "location")


@dataclasses.dataclass(frozen=True)
class Shift:
    """A kind of distribution shift at a level.

    Attributes:
      kind: `"scanner"`, `"contrast"` or `"anatomy"`.
      level: 0 (none: today's data, bitwise) to 3 (strongest).
    """

    kind: str
    level: int

    def __post_init__(self):
        if self.kind not in SHIFT_KINDS:
            raise ValueError(
                f"shift kind must be one of {', '.join(SHIFT_KINDS)}; got {self.kind!r}"
            )
        if isinstance(self.level, bool) or not isinstance(self.level, numbers.Integral):
            raise ValueError(
                f"shift level must be an integer 0-{MAX_SHIFT_LEVEL}; got {self.level!r}"
            )
        object.__setattr__(self, "level", int(self.level))
        if not 0 <= self.level <= MAX_SHIFT_LEVEL:
            raise ValueError(f"shift level must be 0-{MAX_SHIFT_LEVEL}; got {self.level}")

    @classmethod
    def parse(cls, text: str) -> Shift:
        """`"KIND:LEVEL"` (e.g. `"scanner:2"`) -> Shift; ValueError with a one-line message."""
        kind, sep, level = str(text).strip().partition(":")
        level = level.strip()
        if not sep or not (level.isascii() and level.isdigit()):
            raise ValueError(
                f"shift must be KIND:LEVEL with KIND one of {', '.join(SHIFT_KINDS)} and "
                f"LEVEL 0-{MAX_SHIFT_LEVEL} (e.g. scanner:2); got {text!r}"
            )
        return cls(kind.strip().lower(), int(level))

    @property
    def active(self) -> bool:
        """True when the shift changes anything (level >= 1)."""
        return self.level > 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.level}"


@dataclasses.dataclass(frozen=True)
class ScannerShift:
    """Scanner parameters at one level (level 0 is the identity).

    Attributes:
      noise_factor: multiplies the Rician noise std (usually 1.5-4.5% of white matter on T1).
      bias_factor: multiplies the bias field's log-amplitude (usually 0.03-0.12 per unit of a
        smooth 90 mm field).
      slice_mm: slice thickness: a Gaussian slice profile of this FWHM along z, sampled every
        `slice_mm` and linearly interpolated back onto the grid; 0 for none.
      gamma_log: |log gamma| of a per-modality intensity response clean ** gamma (the sign,
        i.e. contrast compressed or stretched, is drawn per case and modality).
      gain_factor: the gain (usually 300-3000) is multiplied or divided (drawn per case and
        modality) by this; z-score or min-max normalisation removes it, gamma it does not.
    """

    noise_factor: float
    bias_factor: float
    slice_mm: float
    gamma_log: float
    gain_factor: float


SCANNER_LEVELS = (
    ScannerShift(noise_factor=1.0, bias_factor=1.0, slice_mm=0.0, gamma_log=0.0, gain_factor=1.0),
    ScannerShift(noise_factor=1.75, bias_factor=2.0, slice_mm=5.0, gamma_log=0.15, gain_factor=2.0),
    ScannerShift(noise_factor=2.5, bias_factor=3.0, slice_mm=7.5, gamma_log=0.3, gain_factor=4.0),
    ScannerShift(noise_factor=3.5, bias_factor=4.0, slice_mm=10.0, gamma_log=0.45, gain_factor=8.0),
)


@dataclasses.dataclass(frozen=True)
class ContrastShift:
    """Tissue contrast at one level (level 0 is the identity).

    Attributes:
      enhancement: share of the T1ce enhancement kept: the enhancing tumour's T1ce mean is
        `unenhanced + enhancement * (1.60 - unenhanced)`, unenhanced = 0.68 (its T1 value on the
        T1ce scale); 0 = no enhancement.
      lesion_contrast: share of the FLAIR and T2 contrast of edema, necrosis, non-enhancing and
        enhancing tumour, lesions and lesion cores against white matter that is kept.
    """

    enhancement: float
    lesion_contrast: float


CONTRAST_LEVELS = (
    ContrastShift(enhancement=1.0, lesion_contrast=1.0),
    ContrastShift(enhancement=0.6, lesion_contrast=0.7),
    ContrastShift(enhancement=0.3, lesion_contrast=0.45),
    ContrastShift(enhancement=0.0, lesion_contrast=0.25),
)

# Anatomy: per level, the radius factor of `small` and `large` tumours, the radius factor of a
# multifocal tumour's primary (it has `level` satellites) and where `location` puts the tumour.
SMALL_SCALE = (1.0, 0.75, 0.55, 0.4)
LARGE_SCALE = (1.0, 1.3, 1.6, 1.9)
MULTIFOCAL_PRIMARY_SCALE = (1.0, 0.8, 0.7, 0.6)
SATELLITE_WHOLE_MM = (8.0, 14.0)  # satellite edema radius, uniform; its core is 0.55 of it
LOCATIONS = ("deep white matter", "juxtacortical", "cerebellar hemisphere", "brainstem")


def anatomy_mode(index: int) -> str:
    """The anatomy-shift mode of case `index`: cycles through `ANATOMY_MODES`.

    `(index + index // 4) % 4`, so every 4 consecutive cases hold each mode once, and the low-
    grade cases (index % 4 == 3) take each mode in turn.
    """
    return ANATOMY_MODES[(index + index // 4) % len(ANATOMY_MODES)]
