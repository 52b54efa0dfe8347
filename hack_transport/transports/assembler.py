"""Frames from a byte stream that arrives in arbitrary chunks (gRPC): validate before allocating."""

from __future__ import annotations

from collections.abc import Callable

from .. import wire
from .base import TransferLimits


class FrameAssembler:
    """feed() stream bytes; complete, verified blocks collect in `blocks`.

    The header is validated before its payload buffer is allocated, so a hostile stream cannot
    make the receiver hold more than the limits allow. on_alloc(n) is told of each allocation.

    A payload that lies wholly inside one fed chunk, starts at an address aligned for every
    tensor (wire.ALIGN) and fills at least half the chunk is kept as a view of that chunk
    instead of being copied into a buffer of its own: a received message then lives as long
    as the block (at most twice the payload's bytes). Otherwise the bytes are copied, and always
    with keep_views=False (a receiver whose buffers are pinned for the GPU copies into those).
    """

    def __init__(
        self,
        limits: TransferLimits,
        expect_model: wire.ModelIdentity | None,
        on_alloc: Callable[[int], None] = lambda n: None,
        alloc: Callable[[int], memoryview] = wire.alloc_payload,
        keep_views: bool = True,
    ):
        self.limits = limits
        self.expect_model = expect_model
        self.on_alloc = on_alloc
        self.alloc = alloc  # a payload buffer of n bytes; every byte is overwritten by the stream
        self.keep_views = keep_views
        self.blocks: list[wire.Block] = []
        self.held = 0
        self._small = bytearray()  # prefix or header being gathered
        self._want = wire.PREFIX.size
        self._prefix: bytes | None = None
        self._header: wire.FrameHeader | None = None
        self._payload: memoryview | None = None
        self._verifier: wire.PayloadVerifier | None = None
        self._filled = 0
        self.views = self.copies = 0  # payloads kept as chunk views / copied (measurements, tests)

    @property
    def idle(self) -> bool:
        """True between frames (a stream may end here)."""
        return self._prefix is None and not self._small

    def feed(self, data: bytes | memoryview, address: int | None = None) -> None:
        """address: where data's first byte lies in memory, if known: lets an aligned payload
        stay a view of `data` (which must not change afterwards, as bytes do not)."""
        mv = memoryview(data).cast("B")
        while len(mv):
            if self._payload is None:
                take = min(self._want - len(self._small), len(mv))
                self._small += mv[:take]
                mv = mv[take:]
                if len(self._small) == self._want:
                    n = self._advance_small()
                    if n is None:
                        continue
                    at = None if address is None else address + len(data) - len(mv)
                    if (
                        self.keep_views
                        and at is not None
                        and not at % wire.ALIGN
                        and n <= len(mv)
                        and 2 * n >= len(data)
                    ):
                        self.views += 1
                        self._start_payload(mv[:n])
                        self._filled = n
                        mv = mv[n:]
                        self._finish_frame()
                    else:
                        self.copies += 1
                        self._start_payload(self.alloc(n))
            else:
                take = min(len(self._payload) - self._filled, len(mv))
                self._payload[self._filled : self._filled + take] = mv[:take]
                self._filled += take
                mv = mv[take:]
                self._verifier.advance(self._filled)  # tensors complete so far, while more arrive
                if self._filled == len(self._payload):
                    self._finish_frame()

    def _advance_small(self) -> int | None:
        """Prefix or header complete: None while the header is still to come, else the
        validated header's payload length (checked against the limits; not yet allocated)."""
        lim = self.limits.frame
        if self._prefix is None:
            _, hlen, self._prefix = wire.parse_prefix(self._small, lim)
            self._small, self._want = bytearray(), hlen
            if hlen:
                return None
        header = wire.parse_header(self._prefix, self._small, lim, self.expect_model)
        if self.held + header.payload_len > self.limits.max_transfer_bytes:
            raise wire.LimitError(
                f"transfer exceeds {self.limits.max_transfer_bytes} bytes", "payload"
            )
        self._header, self._small = header, bytearray()
        return header.payload_len

    def _start_payload(self, payload: memoryview) -> None:
        header = self._header
        self._payload, self._filled = payload, 0
        self._verifier = wire.PayloadVerifier(header, payload)
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
