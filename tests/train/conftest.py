import jax
import pytest


@pytest.fixture(autouse=True)
def standard_dtype_promotion():
    """optax 0.2.8's Adam bias correction (float ** int32 step count) fails under the
    suite's strict dtype promotion; training tests run under JAX's standard rules."""
    with jax.numpy_dtype_promotion("standard"):
        yield
