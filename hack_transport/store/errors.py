"""Errors of the KV store; the service maps each to one gRPC status code."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of store errors."""


class InvalidKeyError(StoreError, ValueError):
    """A key or request argument is malformed (INVALID_ARGUMENT)."""


class ChunkTooLargeError(StoreError, ValueError):
    """A value is larger than the store accepts (INVALID_ARGUMENT / RESOURCE_EXHAUSTED)."""


class CapacityError(StoreError):
    """A tier has no room and nothing can be evicted (RESOURCE_EXHAUSTED)."""


class DiskFullError(CapacityError):
    """The disk tier's quota or file system is full (RESOURCE_EXHAUSTED)."""


class CorruptChunkError(StoreError):
    """A stored chunk failed its checksum; it has been dropped (never served)."""


class InvalidRequestError(StoreError, ValueError):
    """The service refused a request as malformed (INVALID_ARGUMENT)."""


class AuthError(StoreError, PermissionError):
    """The service refused the token (UNAUTHENTICATED)."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The service could not be reached in time, retries included (UNAVAILABLE, DEADLINE_EXCEEDED)."""


class RemoteError(StoreError):
    """Any other error status from the service."""
