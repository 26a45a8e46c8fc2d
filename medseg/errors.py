"""Project-wide exception types. Every message is one line naming the file, key or case at fault.

Command-line entry points turn them into exit codes (``medseg.cli``): ConfigError (UsageError included) 2,
RunInterrupted 130, any other MedsegError 1. A DataError subclass says what is wrong with the data; its ``kind`` is
the name the data audit (``python -m medseg.data check``) reports a case that fails with it under.
"""


class MedsegError(Exception):
    """Base class: an error the user can act on. CLIs print ``str(err)`` on one line and exit non-zero."""


class DataError(MedsegError):
    """Bad input data: unreadable file, mismatching shapes, unknown labels, missing pairs."""

    kind = "load_error"  # any fault without a subclass of its own

    def __init_subclass__(cls, kind: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind


class UnknownLabelError(DataError, kind="unknown_label"):
    """Label values the task's metadata (or dataset.labels of a 2D folder dataset) does not list."""


class BadLabelError(DataError, kind="bad_label"):
    """Values that are not labels: fractional or outside 0..255, a colour mask, a mask that cannot be thresholded."""


class ShapeMismatchError(DataError, kind="shape_mismatch"):
    """Image and label of one case differ in shape."""


class CorruptFileError(DataError, kind="corrupt_file"):
    """A file that cannot be read or decoded: NIfTI, zip member, gzip, pickle, image, JSON."""


class NonFiniteImageError(DataError, kind="non_finite"):
    """An image holding NaN or infinite values: refused at load, before they reach the cache and the loss."""


class UnsafePickleError(DataError, kind="unsafe_pickle"):
    """A pickle referenced a global outside the evalseg allow-list; nothing was executed."""


class MissingPairError(DataError, kind="unpaired"):
    """An image without its label, or a label without its image."""


class LeakageError(DataError, kind="leakage"):
    """A patient group on two sides of a split."""


class ConfigError(MedsegError):
    """Invalid configuration; the message names the dotted key and the allowed values."""


class UsageError(ConfigError):
    """Command-line flags that do not fit together or with what is on disk; the message names the flag."""


class CheckpointError(MedsegError):
    """A checkpoint that is missing, tampered with, or not written by medseg."""


class NonFiniteLossError(MedsegError):
    """The training loss became NaN or infinite."""


class RunInterrupted(MedsegError):
    """Ctrl-C stopped the work and it returned instead of raising KeyboardInterrupt (Ray Tune saves a study on the
    first Ctrl-C): the message names how to continue. CLIs exit 130, as for Ctrl-C itself."""


def error_chain(err: BaseException | None):
    """``err`` and the errors it was raised from (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
