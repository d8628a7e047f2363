"""Synthetic BraTS-like cases built from the MNI152 template: the project's default dataset.

Each case is a real brain, not a phantom: the MNI152 2009c (symmetric, 1 mm) template and its
grey- and white-matter probability maps, which nilearn ships inside its package, are warped by
a per-case random rotation, anisotropic scaling, translation and smooth displacement field and
resampled straight onto the output grid. CSF is the template's brain mask minus grey and white
matter. On that anatomy the generator draws either

* `domain="tumour"`: a glioma with the three BraTS sub-regions (necrotic core, enhancing rim,
  surrounding edema), irregular borders from smooth noise modulating an ellipsoidal radius,
  edema that spreads preferentially along white matter, and an optional mass effect that pushes
  the surrounding tissue away; cases with index % 4 == 3 are low grade (`"LGG"`: little or no
  necrosis, patchy or absent enhancement), the others high grade (`"HGG"`); or
* `domain="lesions"`: 3-10 small multiple-sclerosis-like white-matter lesions, mostly
  periventricular, labelled edema (canonical 2), a few with a T1-dark core labelled 1 and never
  enhancing. It serves as the deep-weight-prior source domain and as an out-of-distribution set.

Four modalities are synthesised from tissue fractions with per-tissue mean intensities that
follow real MRI contrast (T1: WM > GM > CSF; T1ce: T1 plus a bright enhancing rim; T2: CSF
brightest, GM > WM; FLAIR: CSF dark, GM > WM, edema and lesions bright), then degraded like a
scanner would: partial-volume blur, a smooth multiplicative bias field, a random gain per case
and modality, and Rician noise (magnitude of complex Gaussian noise). Voxels outside the brain
are 0, as in the skull-stripped BraTS releases.

Labels are genuinely ambiguous near the edema margin: the edema is a soft probability map
(a logistic ramp 2-5 mm wide that also drives the image intensity), and the label is that map
thresholded at 0.5 after a smooth "rater" shift of its border (1-3 mm standard deviation,
varying over the margin; half as much for the tumour core, capped for small lesions). The soft
map before the rater shift is returned as `SyntheticCase.tumour_probability`.

Geometry: the output grid always covers the BraTS field of view, 240 x 240 x 155 mm, centred
on the brain; voxel spacing is field of view / shape, and the affine is diagonal and RAS
(+x right, +y anterior, +z superior), with world coordinates close to MNI space. The default
grid (64, 64, 48), i.e. 3.75 x 3.75 x 3.23 mm voxels, is small enough for CPU training of a 3D
U-Net with three stride-2 stages (64 and 48 are multiples of 2^3 and 2^4) yet resolves the
tumour sub-regions; `shape=(240, 240, 155)` gives the BraTS 1 mm grid.

Determinism: case `index` of a dataset is drawn from `np.random.SeedSequence((seed, index,
domain))`, so the same configuration gives byte-identical arrays (same numpy/scipy build; the
thread count does not matter) and cases can be generated in any order. All smooth random fields
live on lattices fixed in world millimetres and tumour or lesion sites are chosen on a fixed
4 mm grid, so a case's anatomy and tumour are (up to interpolation) the same at every output
`shape`. What depends on the grid: the voxel-wise noise, and on coarse grids the enhancing rim
(at least 1.1 voxels thick) and the lesion radii (at least 0.9 voxels), so they stay visible.

Cost (one CPU core): about 0.2-0.4 s to generate and 0.5 s to generate and write a default case,
plus about 1 s to load the template once per process and resolution; 10-25 s per case at
240 x 240 x 155 (about 2 GB of memory).

Distribution shift: `SyntheticConfig(shift=Shift("scanner", 2))` (or `"scanner:2"`, CLI
`--shift scanner:2`) gives the same cases with a graded shift: `scanner` (noise, bias field,
slice thickness, intensity response), `contrast` (T1ce enhancement, FLAIR/T2 lesion contrast)
or `anatomy` (tumour size, multifocality, location), level 0 (bitwise the unshifted data) to
3. The shift draws from its own stream, so scanner and contrast shifts keep the labels
bitwise; see `shift.py` and docs/shift.md.

Only numpy and scipy are used (matplotlib for `figure.py`, which draws docs/shift_levels.png);
the template is read through `vi_seg_jax.io.nifti`.

Modules: `config` (what to generate), `fields` (grids and smooth random fields), `anatomy`
(the warped template), `pathology` (tumours and lesions), `contrast` (MR intensities and
scanner artefacts), `shift` (graded distribution shift), `generator` (one case from its
seed), `writing` (release layouts) and `figure` (the shift-levels figure).
"""

from vi_seg_jax.data.synthetic.config import (
    BRATS_FOV_MM,
    DEFAULT_SHAPE,
    DOMAINS,
    GENERATOR_VERSION,
    MIN_SIZE,
    SyntheticConfig,
)
from vi_seg_jax.data.synthetic.generator import SyntheticCase, generate_case
from vi_seg_jax.data.synthetic.pathology import case_grade
from vi_seg_jax.data.synthetic.shift import (
    ANATOMY_MODES,
    MAX_SHIFT_LEVEL,
    SHIFT_KINDS,
    Shift,
    anatomy_mode,
)
from vi_seg_jax.data.synthetic.writing import case_files, case_id, write_case, write_dataset

__all__ = [
    "ANATOMY_MODES",
    "BRATS_FOV_MM",
    "DEFAULT_SHAPE",
    "DOMAINS",
    "GENERATOR_VERSION",
    "MAX_SHIFT_LEVEL",
    "MIN_SIZE",
    "SHIFT_KINDS",
    "Shift",
    "SyntheticCase",
    "SyntheticConfig",
    "anatomy_mode",
    "case_files",
    "case_grade",
    "case_id",
    "generate_case",
    "write_case",
    "write_dataset",
]
