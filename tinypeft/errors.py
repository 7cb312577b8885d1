"""Error types. Every error tinypeft raises on purpose is one of these, and its message says
what was wrong and what is allowed.

They subclass the builtin a caller would expect (ValueError, TypeError, OSError), so
`except ValueError` keeps working, and `except TinyPeftError` catches all of them.
"""


class TinyPeftError(Exception):
    """Base class of every error tinypeft raises on purpose."""


class ConfigError(TinyPeftError, ValueError):
    """A model or method configuration that cannot work (bad sizes, ranks, targets, options)."""


class InputError(TinyPeftError, ValueError):
    """Bad call-time input: token ids, labels, attention masks, shapes."""


class InputTypeError(TinyPeftError, TypeError):
    """Input of the wrong type (for example float token ids)."""


class CheckpointError(TinyPeftError, ValueError):
    """A file or folder that cannot be loaded: missing, truncated, corrupt, wrong names/shapes/dtypes,
    or written for another model or method."""


class MergeError(TinyPeftError, ValueError):
    """A merge that cannot be done: non-finite merged weights, or a method that has no merge."""


class TrainingError(TinyPeftError, RuntimeError):
    """Training cannot go on (for example the loss became non-finite)."""
