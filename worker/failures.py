"""How a worker words and classifies a failed task: the stored error text, and whether a retry may pass.

:func:`error_text` is what a failed task stores (the message, then the last frames of the
traceback); :func:`deterministic` and :func:`permanent_types` say which errors would recur on any
worker (reported with ``retry=False``); :func:`is_transient` which failures to reach the service
may go away by themselves.
"""

from __future__ import annotations

import traceback

from bocompress.errors import APIConnectionError, APIStatusError, BocompressError

__all__ = ["ERROR_FRAMES", "MAX_ERROR_CHARS", "deterministic", "error_text", "is_transient", "permanent_types"]


def is_transient(exc: BaseException) -> bool:
    """A failure to talk to the service that may go away by itself (connection, 5xx, 429)."""
    if isinstance(exc, APIConnectionError):
        return True
    return isinstance(exc, APIStatusError) and (exc.status_code >= 500 or exc.status_code in (408, 429))


def _last_line(exc: BaseException) -> str:
    """The last line of the exception's traceback, e.g. ``RuntimeError: shapes do not match``."""
    lines = [ln for ln in traceback.format_exception_only(type(exc), exc) if ln.strip()]
    text = lines[-1].strip() if lines else type(exc).__name__
    return text[:2000]


#: Frames of the traceback kept in a stored error (the innermost ones), and its longest length.
ERROR_FRAMES = 6
MAX_ERROR_CHARS = 6000


def error_text(exc: BaseException, message: str | None = None, frames: int = ERROR_FRAMES) -> str:
    """What a failed task stores: the message on the first line, then the last frames of the traceback.

    The first line is what a user reads first (and what a job that failed as a whole reports as
    its reason); the frames say where it happened. At most :data:`MAX_ERROR_CHARS` characters.
    """
    head = (message or _last_line(exc)).strip()[:2000] or type(exc).__name__
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    chain = exc.__cause__ or exc.__context__
    if chain is not None and chain.__traceback__ is not None:  # where the original error came from
        tb = (traceback.extract_tb(chain.__traceback__)[-max(1, frames // 2):] + tb)[-frames:]
    body = "".join(traceback.format_list(tb)).rstrip()
    text = f"{head}\n\nlast frames (innermost last):\n{body}\n{_last_line(exc)}" if body else head
    if len(text) > MAX_ERROR_CHARS:
        text = head[:1000] + "\n...\n" + text[-(MAX_ERROR_CHARS - 1010):]
    return text


#: Substrings of a RuntimeError that may not recur on another worker or attempt (memory, device).
_TRANSIENT_MARKERS = ("out of memory", "cuda", "cudnn", "nccl", "device-side", "connection")
#: Substrings of torch's RuntimeErrors about shapes and dtypes: the same inputs fail the same way.
_SHAPE_MARKERS = ("shape", "size mismatch", "sizes of tensors", "dimension", "dtype", "scalar type",
                  "mat1 and mat2", "must match", "expected input", "expected tensor", "channels")


def deterministic(exc: BaseException) -> bool:
    """An error that would recur on any attempt: a type, shape, value or lookup error of the
    model's code or its inputs. Memory, device and I/O errors are not (another attempt may pass)."""
    from bocompress.worker.batch import BatchError

    if isinstance(exc, (MemoryError, OSError, BocompressError)):
        return False
    if isinstance(exc, BatchError):
        return True
    if isinstance(exc, (TypeError, ValueError, KeyError, IndexError, AttributeError, NotImplementedError,
                        ImportError, AssertionError, ZeroDivisionError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(m in text for m in _SHAPE_MARKERS) and not any(m in text for m in _TRANSIENT_MARKERS)
    return False


def permanent_types() -> tuple[type[BaseException], ...]:
    """Errors that would recur on any worker: the task fails without a retry.

    ``CompressionError`` covers ``NoLayerMatched`` and ``CostMismatch``.
    """
    from bocompress.worker.methods.base import CompressionError
    from bocompress.worker.runtime import TaskError
    from bocompress.worker.zoo import WeightsMismatch, ZooError

    return (TaskError, CompressionError, WeightsMismatch, ZooError)
