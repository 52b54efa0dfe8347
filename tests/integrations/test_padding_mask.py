"""Reading each row's left padding from the 4D attention masks transformers builds (no model)."""

import pytest
import torch

from hack_integrations.transformers_attention import left_padding
from hack_integrations.transformers_cache import HackCacheError


def _causal(pads, q, kv, dtype):
    allowed = torch.ones(len(pads), 1, q, kv, dtype=torch.bool).tril(kv - q)
    for b, p in enumerate(pads):
        allowed[b, ..., :p] = False
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("pads", [[0], [3, 0, 1], [0, 6]])
def test_left_padding_read_back(dtype, pads):
    assert left_padding(_causal(pads, 7, 7, dtype), len(pads), 7) == pads


def test_no_mask_means_no_padding():
    assert left_padding(None, 3, 5) == [0, 0, 0]


def test_right_padding_refused():
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[..., 3] = False
    with pytest.raises(HackCacheError, match="left padding"):
        left_padding(mask, 1, 4)
