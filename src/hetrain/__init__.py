"""hetrain: train one model on a mix of accelerator kinds at once, exactly."""

__version__ = "0.1.0"
