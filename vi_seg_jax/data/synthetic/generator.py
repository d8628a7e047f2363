"""One synthetic case: the seeded random streams and the steps that build it, in order."""

from __future__ import annotations

import dataclasses

import numpy as np

from vi_seg_jax.data.synthetic.anatomy import (
    draw_warp,
    load_template,
    sample_anatomy,
    template_factor,
    template_points,
)
from vi_seg_jax.data.synthetic.config import DOMAINS, SyntheticConfig
from vi_seg_jax.data.synthetic.contrast import render
from vi_seg_jax.data.synthetic.fields import FieldSampler, coarse_grid, output_grid
from vi_seg_jax.data.synthetic.pathology import (
    case_grade,
    draw_lesion_sites,
    draw_tumour,
    lesion_maps,
    mass_displacement,
    shift_tumour,
    tumour_maps,
)
from vi_seg_jax.data.synthetic.shift import CONTRAST_LEVELS, SCANNER_LEVELS, anatomy_mode


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One generated case, in canonical classes.

    Attributes:
      index: position in the dataset.
      label: [X, Y, Z] uint8 canonical classes (0 bg, 1 necrotic/non-enhancing core, 2 edema,
        3 enhancing).
      images: modality (`t1`, `t1ce`, `t2`, `flair`) -> [X, Y, Z] float32, 0 outside the brain.
      affine: [4, 4] float64 voxel -> world mm.
      brain_mask: [X, Y, Z] bool, the skull-stripping mask.
      tumour_probability: [X, Y, Z] float32 in [0, 1], the soft whole-tumour (or lesion)
        fraction of each voxel before the rater shift: a reference for aleatoric uncertainty.
      tissue_fractions: `csf`, `gm`, `wm` -> [X, Y, Z] float32, the share of each voxel
        taken by normal (non-tumour) tissue of that kind.
      grade: `"HGG"` or `"LGG"` for tumours, None for lesions.
    """

    index: int
    label: np.ndarray
    images: dict[str, np.ndarray]
    affine: np.ndarray
    brain_mask: np.ndarray
    tumour_probability: np.ndarray
    tissue_fractions: dict[str, np.ndarray]
    grade: str | None


def generate_case(config: SyntheticConfig, index: int) -> SyntheticCase:
    """Generates case `index` of the dataset described by `config` (pure, deterministic).

    A shifted config (`config.shift` at level >= 1) gives the same case with only the shifted
    aspect changed: the shift draws from a seventh child of the case's seed sequence, spawned
    after the six used here, so the other streams are untouched.

    Args:
      config: grid, domain, seed and optional shift.
      index: case number, >= 0.

    Returns:
      The case with canonical labels, four float32 modalities and the shared affine.
    """
    if index < 0:
        raise ValueError(f"case index must be >= 0; got {index}")
    domain_code = DOMAINS.index(config.domain)
    sequence = np.random.SeedSequence((config.seed, index, domain_code))
    anatomy_rng, lesion_rng, field_rng, contrast_rng, scanner_rng, noise_rng = (
        np.random.default_rng(s) for s in sequence.spawn(6)
    )
    shift = config.shift if config.shift is not None and config.shift.active else None
    shift_rng = np.random.default_rng(sequence.spawn(1)[0]) if shift is not None else None
    fields = FieldSampler(config, field_rng)
    grid, coarse = output_grid(config), coarse_grid(config)
    template = load_template(template_factor(config.spacing))

    warp = draw_warp(anatomy_rng, fields)
    # Sites are chosen on a fixed coarse grid and template, so they do not depend on `shape`.
    coarse_template = load_template(template_factor(coarse.spacing))
    coarse_anatomy = sample_anatomy(warp, coarse, coarse_template)
    named = {
        "core": fields.draw(14.0),
        "nec": fields.draw(10.0),
        "edema": fields.draw(22.0),
        "patch": fields.draw(10.0),
        "rater": fields.draw(8.0),
        "rater_mm": float(field_rng.uniform(1.0, 3.0)),
    }
    texture = fields.draw(5.0)(grid)
    if config.domain == "tumour":
        grade = case_grade(index)
        tumour = draw_tumour(anatomy_rng, grade, coarse, coarse_anatomy, config.spacing)
        tumours = [tumour]
        if shift is not None and shift.kind == "anatomy":
            mni = template_points(warp, coarse)
            tumours = shift_tumour(
                tumour,
                anatomy_mode(index),
                shift.level,
                shift_rng,
                coarse,
                coarse_anatomy,
                mni,
                config.spacing,
            )
        mass = mass_displacement(grid, tumours) if config.mass_effect else None
        anatomy = sample_anatomy(warp, grid, template, mass)
        fractions, label, probability = tumour_maps(tumours, grid, anatomy, named, config.spacing)
    else:
        grade = None
        sites = draw_lesion_sites(lesion_rng, coarse, coarse_anatomy, max(config.spacing))
        anatomy = sample_anatomy(warp, grid, template)
        fractions, label, probability = lesion_maps(
            sites, lesion_rng, grid, anatomy, named, config.spacing
        )
    brain_mask = anatomy["brain"] > 0.5
    scanner_fields = FieldSampler(config, scanner_rng)
    kind = shift.kind if shift is not None else None
    images = render(
        fractions,
        brain_mask,
        grid,
        contrast_rng,
        scanner_rng,
        noise_rng,
        scanner_fields,
        texture,
        scanner=SCANNER_LEVELS[shift.level] if kind == "scanner" else None,
        contrast=CONTRAST_LEVELS[shift.level] if kind == "contrast" else None,
        shift_rng=shift_rng,
    )
    return SyntheticCase(
        index=index,
        label=label,
        images=images,
        affine=config.affine,
        brain_mask=brain_mask,
        tumour_probability=probability,
        tissue_fractions={t: fractions[t].astype(np.float32) for t in ("csf", "gm", "wm")},
        grade=grade,
    )
