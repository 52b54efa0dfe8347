import pytest

from hack_kernels import HackConfig


def test_defaults():
    c = HackConfig()
    assert (c.bits, c.partition, c.layout, c.sink_tokens, c.rounding) == (
        2,
        64,
        "kivi",
        0,
        "nearest",
    )
    assert c.levels == 3


@pytest.mark.parametrize(
    "field,value",
    [
        ("bits", 3),
        ("bits", 16),
        ("partition", 63),
        ("partition", 0),
        ("rounding", "up"),
        ("layout", "vllm"),
        ("seed", -1),
        ("sink_tokens", -2),
        ("sink_tokens", 1.5),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HackConfig(**{field: value})
