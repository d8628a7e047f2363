"""The deep weight prior (Atanov et al. 2019): a VAE over convolution kernel slices."""
