"""Test-time flips over simulated CPU devices: the same predictive as one device.

The device count is fixed when JAX starts, so the check runs in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=3` and prints the largest differences.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax

_CHECK = textwrap.dedent(
    """
    import dataclasses, json
    from pathlib import Path

    import jax
    import jax.numpy as jnp
    import numpy as np

    from vi_seg_jax.parallel import data_mesh
    from vi_seg_jax.predict import Predictor, TrainedModel
    from vi_seg_jax.train.build import build_spec
    from vi_seg_jax.train.config import BackboneConfig, DataConfig, TrainConfig
    from vi_seg_jax.train.state import create_train_state
    from vi_seg_jax.uncertainty import mirror_flips, posterior_predictive, sample_fn_for

    config = TrainConfig(
        backbone=BackboneConfig(features=(4, 8)), data=DataConfig(patch_shape=(8, 8, 8))
    )
    spec = build_spec(config, num_data=1.0)
    state = create_train_state(jax.random.key(0), spec, jnp.zeros((1, 8, 8, 8, 4)))
    wide = jax.tree_util.tree_map(lambda v: v + 4.0, state.guide.log_var)
    state = state.replace(guide=dataclasses.replace(state.guide, log_var=wide))

    def difference(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))

    # posterior_predictive (scanned, psum per flip): 5 samples over 3 devices, chunks of 2.
    images = jax.random.normal(jax.random.key(5), (1, 8, 8, 8, 4))
    sizes = dict(num_samples=5, chunk_size=2, flips=mirror_flips((1, 2, 3)))
    sample_fn = sample_fn_for(spec, state)
    key = jax.random.key(9)
    single = posterior_predictive(sample_fn, images, key, **sizes)
    meshed = posterior_predictive(sample_fn, images, key, mesh=data_mesh(3), **sizes)

    # The Predictor (stacked per-device sums, pooled when a flip closes).
    model = TrainedModel(Path("."), config, spec, state, 0, {})
    volume = np.asarray(jax.random.normal(jax.random.key(1), (20, 12, 9, 4)))
    kwargs = dict(num_samples=5, window_size=32, chunk_size=2, tta="flips")
    one = Predictor(model, **kwargs).predictive(volume, key)
    three = Predictor(model, mesh=data_mesh(3), **kwargs).predictive(volume, key)
    print(json.dumps({
        "scan": difference(single, meshed),
        "predictor": difference(one, three),
        "tta_max": float(np.max(one.tta)),
        "epistemic_max": float(np.max(one.epistemic)),
    }))
    """
)


def test_flips_over_devices_equal_one_device():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=3",
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "JAX_NUMPY_RANK_PROMOTION": "raise",
        "JAX_NUMPY_DTYPE_PROMOTION": "strict",
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    result = subprocess.run(
        [sys.executable, "-c", _CHECK],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tta_max"] > 1e-4 and report["epistemic_max"] > 1e-4  # both parts real
    # Float32 sums in another order only.
    assert report["scan"] < 1e-6 and report["predictor"] < 1e-6, report
