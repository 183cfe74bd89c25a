"""Wan 2.1 model, attention, VAE and schedulers."""
