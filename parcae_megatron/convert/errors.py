"""The one exception type conversion raises for bad input (shown to users without a trace)."""


class ConversionError(RuntimeError):
    """A checkpoint or directory that cannot be converted, with the reason."""
