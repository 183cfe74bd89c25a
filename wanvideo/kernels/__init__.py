"""Numerical kernels with a plain-torch reference next to each optional accelerated version."""
