"""The converters' one error type, in a module of its own so that the CLI can catch it before importing torch."""


class ConversionError(ValueError):
    """The source cannot be converted as it is: an unsupported feature, an inconsistent checkpoint or a bad file."""
