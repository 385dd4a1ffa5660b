"""The one error type of ringserve, and how it maps to gRPC status codes and exit codes.

User mistakes (bad paths, bad sampling values, prompts that do not fit) raise a
``RingserveError`` subclass with a message a person can act on. Services map it to a gRPC
status with ``grpc_status``; the command line prints the message and exits non-zero.
"""

from __future__ import annotations


class RingserveError(Exception):
    """Base class; ``code`` names the gRPC status code the error maps to."""

    code = "INTERNAL"


class InvalidArgument(RingserveError):
    """The request itself is wrong: fix the input."""

    code = "INVALID_ARGUMENT"


class NotFound(RingserveError):
    """A named thing (model path, request id) does not exist."""

    code = "NOT_FOUND"


class ResourceExhausted(RingserveError):
    """Not enough KV blocks, slots or memory right now."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(RingserveError):
    """The system is not in a state to do this (e.g. a corrupt checkpoint, a misconfigured group)."""

    code = "FAILED_PRECONDITION"


class Unavailable(RingserveError):
    """A peer (rank, service, Redis) cannot be reached; retrying may help."""

    code = "UNAVAILABLE"


class DeadlineExceeded(RingserveError):
    """Something did not finish in its time budget."""

    code = "DEADLINE_EXCEEDED"


class Aborted(RingserveError):
    """A peer failed this request's part of the work (e.g. a KV push to a decode rank): the request
    ended, and retrying it elsewhere may help."""

    code = "ABORTED"


def grpc_status(err: RingserveError):
    """The ``grpc.StatusCode`` for an error (imported lazily: the engine does not need grpc)."""
    import grpc

    return getattr(grpc.StatusCode, err.code)


class PermissionDenied(RingserveError):
    """The caller may not do this: a KV landing or frame that fails its MAC, replayed, expired."""

    code = "PERMISSION_DENIED"


class Cancelled(RingserveError):
    """The caller went away or cancelled; whatever the request held has been freed."""

    code = "CANCELLED"


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Aborted,
        PermissionDenied,
    )
}


def error_from_code(code: str, message: str) -> RingserveError:
    """The error type for a status code name (e.g. one reported by a peer service)."""
    return _BY_CODE.get(code, RingserveError)(message)
