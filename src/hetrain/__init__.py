"""hetrain: train one model on a mix of accelerator kinds at once, exactly."""

__version__ = "0.1.0"


def fit(*args, **kwargs):
    """See hetrain.api.fit (imported lazily: `import hetrain` stays light)."""
    from hetrain.api import fit as _fit

    return _fit(*args, **kwargs)


__all__ = ["fit"]
