"""A two-convolution network: small enough to check estimators against closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyNet(nn.Module):
    features: int = 3
    num_classes: int = 2
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        hidden = nn.Conv(self.features, (3, 3), use_bias=False, name="conv_1")(x)
        x = nn.relu(hidden)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Conv(self.features, (3, 3), use_bias=False, name="conv_2")(x)
        x = nn.relu(x)
        return nn.Conv(self.num_classes, (1, 1), name="head")(x), {"hidden": hidden}


def tiny_batch(key=None, shape=(2, 6, 6)):
    key = jax.random.key(1) if key is None else key
    images = jax.random.normal(key, (*shape, 1))
    labels = (images[..., 0] > 0.3).astype(jnp.uint8)
    return images, labels
