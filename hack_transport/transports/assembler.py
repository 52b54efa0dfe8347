"""Frames from a byte stream that arrives in arbitrary chunks (gRPC): validate before allocating."""

from __future__ import annotations

from collections.abc import Callable

from .. import wire
from .base import TransferLimits


class FrameAssembler:
    """feed() stream bytes; complete, verified blocks collect in `blocks`.

    The header is validated before its payload buffer is allocated, so a hostile stream cannot
    make the receiver hold more than the limits allow. on_alloc(n) is told of each allocation.
    """

    def __init__(
        self,
        limits: TransferLimits,
        expect_model: wire.ModelIdentity | None,
        on_alloc: Callable[[int], None] = lambda n: None,
        alloc: Callable[[int], memoryview] = wire.alloc_payload,
    ):
        self.limits = limits
        self.expect_model = expect_model
        self.on_alloc = on_alloc
        self.alloc = alloc  # a payload buffer of n bytes; every byte is overwritten by the stream
        self.blocks: list[wire.Block] = []
        self.held = 0
        self._small = bytearray()  # prefix or header being gathered
        self._want = wire.PREFIX.size
        self._prefix: bytes | None = None
        self._header: wire.FrameHeader | None = None
        self._payload: memoryview | None = None
        self._verifier: wire.PayloadVerifier | None = None
        self._filled = 0

    @property
    def idle(self) -> bool:
        """True between frames (a stream may end here)."""
        return self._prefix is None and not self._small

    def feed(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            if self._payload is None:
                take = min(self._want - len(self._small), len(mv))
                self._small += mv[:take]
                mv = mv[take:]
                if len(self._small) == self._want:
                    self._advance_small()
            else:
                take = min(len(self._payload) - self._filled, len(mv))
                self._payload[self._filled : self._filled + take] = mv[:take]
                self._filled += take
                mv = mv[take:]
                self._verifier.advance(self._filled)  # tensors complete so far, while more arrive
                if self._filled == len(self._payload):
                    self._finish_frame()

    def _advance_small(self) -> None:
        lim = self.limits.frame
        if self._prefix is None:
            _, hlen, self._prefix = wire.parse_prefix(self._small, lim)
            self._small, self._want = bytearray(), hlen
            if hlen:
                return
        header = wire.parse_header(self._prefix, self._small, lim, self.expect_model)
        if self.held + header.payload_len > self.limits.max_transfer_bytes:
            raise wire.LimitError(
                f"transfer exceeds {self.limits.max_transfer_bytes} bytes", "payload"
            )
        self._header, self._small = header, bytearray()
        self._payload, self._filled = self.alloc(header.payload_len), 0
        self._verifier = wire.PayloadVerifier(header, self._payload)
        self.held += header.payload_len
        self.on_alloc(header.payload_len)
        if header.payload_len == 0:
            self._finish_frame()

    def _finish_frame(self) -> None:
        self.blocks.append(self._verifier.block())
        if len(self.blocks) > self.limits.max_frames:
            raise wire.LimitError(f"more than {self.limits.max_frames} frames", "payload")
        self._prefix = self._header = self._payload = self._verifier = None
        self._want = wire.PREFIX.size
