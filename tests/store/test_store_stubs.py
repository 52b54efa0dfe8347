"""The committed gRPC stubs are exactly what grpcio-tools generates from proto/hack_kv_store.proto."""

from __future__ import annotations

import pytest

from hack_transport.store.gen_stubs import REPO, generate


@pytest.mark.timeout(60)
def test_committed_stubs_match_the_proto(tmp_path):
    for fresh in generate("hack_kv_store", tmp_path):
        committed = REPO / fresh.relative_to(tmp_path)
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run python -m hack_transport.store.gen_stubs"
        )
