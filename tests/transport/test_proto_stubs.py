"""The committed gRPC stubs of proto/hack_kv.proto are what grpcio-tools generates from it."""

from pathlib import Path

import pytest

from hack_transport.store.gen_stubs import REPO, generate

pytest.importorskip("grpc_tools")


@pytest.mark.timeout(60)
def test_kv_transfer_stubs_match_proto(tmp_path: Path):
    for fresh in generate("hack_kv", tmp_path):
        committed = REPO / "hack_transport/proto" / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run `python -m hack_transport.store.gen_stubs hack_kv`"
        )
