"""Numerical kernels the backbones are built on: 3D convolutions chosen by measurement."""

from vi_seg_jax.ops.conv3d import CONV_IMPLS, ConvEngine
from vi_seg_jax.ops.conv_forms import FORWARD_FORMS, KERNEL_GRAD_FORMS, ConvChoice
from vi_seg_jax.ops.conv_tuning import (
    TuningReport,
    clear_tuning_memory,
    conv_choice,
    tuning_file,
    tuning_report,
)

__all__ = [
    "CONV_IMPLS",
    "FORWARD_FORMS",
    "KERNEL_GRAD_FORMS",
    "ConvChoice",
    "ConvEngine",
    "TuningReport",
    "clear_tuning_memory",
    "conv_choice",
    "tuning_file",
    "tuning_report",
]
