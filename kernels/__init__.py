"""deltaserve.kernels."""
