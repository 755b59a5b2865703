"""Errors that mean "the input is wrong", as opposed to a bug: entry points print them and exit with code 2."""


class InputError(ValueError):
    """Bad data, option or checkpoint; the message names the file, row, field or option and what was expected."""


class DataError(InputError):
    """The data as a whole cannot be used (missing path, column or split)."""


class BadInputError(InputError):
    """One row, file or field cannot be used."""


class CheckpointError(InputError):
    """A checkpoint directory or file is missing, corrupt or from an incompatible configuration."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. the disk is full); the previous checkpoint is left intact."""
