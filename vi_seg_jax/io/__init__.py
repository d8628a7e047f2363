"""NIfTI input and output. The only place in vi_seg_jax that imports nibabel."""

from vi_seg_jax.io.nifti import (
    NiftiHeaderInfo,
    NiftiVolume,
    read_nifti,
    read_nifti_header,
    write_nifti,
)

__all__ = [
    "NiftiHeaderInfo",
    "NiftiVolume",
    "read_nifti",
    "read_nifti_header",
    "write_nifti",
]
