"""Test settings: CPU only, strict JAX numerics, a persistent compile cache."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On a GPU, tests that start CLI subprocesses need memory beside this process's.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# No convolution tuning (tests/ops/test_conv_tuning.py opts in on tiny convs): the suite's
# shapes are below the tuning threshold anyway, and its CLI subprocesses inherit this.
os.environ.setdefault("VI_SEG_JAX_CONV_TUNING_SECONDS", "0")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "VI_SEG_JAX_TEST_JAX_CACHE",
        str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vi_seg_jax" / "jax"),
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# Full float32 matmuls and convolutions on GPUs too (not TF32), so that numerical
# comparisons mean the same on every backend (benchmarks/gpu_check.sh runs tests on a GPU).
jax.config.update("jax_default_matmul_precision", "highest")
# Tiny shapes: compilation, not execution, dominates the suite's time.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def getkey():
    """Returns a function giving a fresh typed key on each call."""
    counter = iter(range(1_000_000))
    return lambda: jax.random.key(next(counter))
