from vi_seg_jax.backbones.unet import UNet
