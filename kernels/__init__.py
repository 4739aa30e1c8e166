"""privfed kernels."""
