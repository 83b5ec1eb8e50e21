"""fqtrun: an experiment runner for low-precision (fully quantized, cyclic, N:M sparse) training."""

__version__ = "0.1.0"
