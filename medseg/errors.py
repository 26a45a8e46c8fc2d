"""Project-wide exception types. Every message is one line naming the file, key or case at fault."""


class MedsegError(Exception):
    """Base class: an error the user can act on. CLIs print ``str(err)`` on one line and exit non-zero."""


class DataError(MedsegError):
    """Bad input data: unreadable file, mismatching shapes, unknown labels, missing pairs."""


class UnsafePickleError(DataError):
    """A pickle referenced a global outside the evalseg allow-list; nothing was executed."""


class ConfigError(MedsegError):
    """Invalid configuration; the message names the dotted key and the allowed values."""


class CheckpointError(MedsegError):
    """A checkpoint that is missing, tampered with, or not written by medseg."""


class NonFiniteLossError(MedsegError):
    """The training loss became NaN or infinite."""
