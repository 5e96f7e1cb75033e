"""The one error type of the interop package, so callers can catch checkpoint problems."""


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be read or does not fit the model.

    It subclasses ValueError, so `cbam`'s command line reports it as a usage error. When it is
    raised by a loader, the model has not been changed.
    """
