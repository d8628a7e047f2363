"""oneDNN's convolutions called from jitted programs (`vi_seg_jax.ops.onednn`).

Values and kernel gradients are compared with `lax.conv_general_dilated` on the shapes the
backbones use and on odd ones; `test_conv3d.py` checks the formulation inside the engine
(strided rewrites, input gradients, mixed choices) like every other.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vi_seg_jax.ops import onednn
from vi_seg_jax.ops.conv_tuning import machine_description

DN = ("NDHWC", "DHWIO", "NDHWC")

CASES = [
    ((2, 6, 5, 7, 3), (3, 3, 3, 3, 4), ((1, 1),) * 3),
    ((1, 6, 5, 4, 3), (3, 3, 3, 3, 2), ((2, 0), (0, 1), (1, 2))),
    ((1, 5, 5, 5, 16), (2, 2, 2, 16, 8), ((0, 0),) * 3),  # a strided conv's rewrite
    ((1, 4, 4, 4, 5), (1, 1, 1, 5, 7), ((0, 0),) * 3),
]


def _array(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_library_is_installed_here():
    """The dependency is declared for x86-64 Linux, where the test suite runs."""
    assert onednn.available(), "oneDNN did not load: is onednn-cpu-gomp installed?"
    assert onednn.version().startswith("3.")
    assert machine_description()["onednn"] == onednn.version()


@pytest.mark.parametrize(("x_shape", "w_shape", "pads"), CASES)
def test_forward_and_kernel_grad_match_lax(x_shape, w_shape, pads):
    x, w = _array(x_shape, 1), _array(w_shape, 2)
    y_ref, vjp = jax.vjp(
        lambda w: lax.conv_general_dilated(x, w, (1,) * 3, pads, None, None, DN), w
    )
    dy = _array(y_ref.shape, 3)
    y = jax.jit(lambda x, w: onednn.forward(x, w, pads, None, None))(x, w)
    dw = jax.jit(lambda x, dy: onednn.kernel_grad(x, dy, w_shape, pads, None))(x, dy)
    scale = float(jnp.max(jnp.abs(y_ref)))
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * scale, rtol=1e-5)
    (dw_ref,) = vjp(dy)
    np.testing.assert_allclose(dw, dw_ref, atol=1e-5 * float(jnp.max(jnp.abs(dw_ref))), rtol=1e-5)


def test_vmap_over_per_sample_kernels():
    """Ensembles and full weight sampling vmap the conv over kernels: one call per sample."""
    pads = ((1, 1),) * 3
    x, w = _array((3, 1, 5, 4, 6, 2), 4), _array((3, 3, 3, 3, 2, 5), 5)
    y = jax.vmap(lambda x, w: onednn.forward(x, w, pads, None, None))(x, w)
    ref = jax.vmap(lambda x, w: lax.conv_general_dilated(x, w, (1,) * 3, pads, None, None, DN))(
        x, w
    )
    np.testing.assert_allclose(y, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))), rtol=1e-5)


def test_a_call_on_another_thread_than_the_one_that_planned_it():
    """XLA runs custom calls on its own threads. oneDNN's own scratchpad belongs to the
    thread that created the primitive, so a kernel that needs one (the gemm-based kernel
    gradient on a 2³ grid) crashed elsewhere; the scratchpad is now passed in. In a
    subprocess, so that a crash fails this test only."""
    code = """
import threading
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from vi_seg_jax.ops import onednn
pads = ((1, 1),) * 3
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 2, 8)), jnp.float32)
dy = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 2, 8)), jnp.float32)
grad = jax.jit(lambda x, dy: onednn.kernel_grad(x, dy, (3, 3, 3, 8, 8), pads, None))
grad(x, dy).block_until_ready()  # the primitive is made on this thread
results = []
worker = threading.Thread(target=lambda: results.append(grad(x, dy)))
worker.start()
worker.join()
dn = ("NDHWC", "DHWIO", "NDHWC")
conv = lambda w: lax.conv_general_dilated(x, w, (1,) * 3, pads, None, None, dn)
_, vjp = jax.vjp(conv, jnp.zeros((3, 3, 3, 8, 8)))
print(float(jnp.max(jnp.abs(results[0] - vjp(dy)[0]))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert float(done.stdout.split()[-1]) < 1e-4


def test_other_dtypes_are_refused_with_the_reason():
    x = jnp.ones((1, 4, 4, 4, 2), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"'onednn' needs .* float32; got bfloat16"):
        onednn.forward(x, jnp.ones((3, 3, 3, 2, 2), jnp.bfloat16), ((1, 1),) * 3, None, None)
    assert not onednn.available(jnp.bfloat16)


def test_a_missing_library_is_unavailable(tmp_path):
    """Where the library is missing the formulation is no candidate, and says why if forced."""
    code = (
        "import jax.numpy as jnp\n"
        "from vi_seg_jax.ops import onednn\n"
        "print(onednn.available(), onednn.version())\n"
        "from vi_seg_jax.errors import DataError\n"
        "from vi_seg_jax.ops.conv_tuning import check_settings\n"
        "try:\n"
        "    check_settings()\n"
        "except DataError as error:\n"
        "    print('refused:', error)\n"
        "onednn.forward(jnp.ones((1, 3, 3, 3, 1)), jnp.ones((1, 1, 1, 1, 1)), ((0, 0),) * 3, None, None)\n"
    )
    env = {
        **os.environ,
        onednn.ENV_LIBRARY: str(tmp_path / "libdnnl.so.3"),
        "VI_SEG_JAX_CONV_FORMULATION": "onednn",
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    first, refused = done.stdout.splitlines()
    assert first.split() == ["False", "None"]
    assert "VI_SEG_JAX_CONV_FORMULATION" in refused and "oneDNN library" in refused
    assert "needs the oneDNN library" in done.stderr
