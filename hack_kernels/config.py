"""HackConfig: the knobs of HACK's quantization, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_PARTITIONS = (32, 64, 128)
ROUNDINGS = ("stochastic", "nearest")
LAYOUTS = ("paper", "kivi")


@dataclass(frozen=True)
class HackConfig:
    """How K and V are quantized.

    bits: code width of K and V (2 by default; 4 and 8 supported).
    partition: elements per quantization group (64 by default; 32 and 128).
    rounding: "nearest" (lowest error, the authors' artifact default) or "stochastic" (unbiased,
        the paper's description).
    seed: seed of the stochastic rounding stream.
    layout: "kivi" (default: K grouped along tokens per channel, V along head_dim per token, scales
        folded into Q and P) or "paper" (K along head_dim per token, V along tokens per channel).
        On SmolLM2's real K, kivi halves the attention error at 2 bits (per-channel K absorbs the
        outlier channels; benchmarks/results/inspect_smollm2.json, accuracy.md); the Triton kernels
        cover the paper layout only so far.
    sink_tokens: leading tokens kept in 16-bit.
    """

    bits: int = 2
    partition: int = 64
    rounding: str = "nearest"
    seed: int = 0
    layout: str = "kivi"
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if not isinstance(self.partition, int) or self.partition not in SUPPORTED_PARTITIONS:
            raise ValueError(
                f"partition must be one of {SUPPORTED_PARTITIONS}, got {self.partition!r}"
            )
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if (
            not isinstance(self.sink_tokens, int)
            or isinstance(self.sink_tokens, bool)
            or self.sink_tokens < 0
        ):
            raise ValueError(f"sink_tokens must be a non-negative int, got {self.sink_tokens!r}")

    @property
    def levels(self) -> int:
        """Largest code value, 2^bits - 1."""
        return (1 << self.bits) - 1

    def replace(self, **changes: object) -> HackConfig:
        return HackConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)
