"""The shipped XS model's record and the one flip-test rule (issue 21, item 2)."""

from __future__ import annotations

import pytest

from cnpose_trt import shipped


def test_record_hashes_are_the_files_own():
    """The record lets the model be recognised without torch: its hashes must be the file's real ones."""
    from cnpose_trt.cache import file_sha256

    assert shipped.record()["file_sha256"] == file_sha256(shipped.SHIPPED_XS)
    assert shipped.record()["bytes"] == shipped.SHIPPED_XS.stat().st_size
    pytest.importorskip("torch")
    from cnpose_trt.build import weights_fingerprint

    assert shipped.record()["weights_sha256"] == weights_fingerprint(shipped.SHIPPED_XS)


def test_recognised_from_file_and_from_engine_metadata(tmp_path):
    assert shipped.is_shipped_checkpoint(shipped.SHIPPED_XS)
    other = tmp_path / "other.pth.tar"
    data = bytearray(shipped.SHIPPED_XS.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    assert not shipped.is_shipped_checkpoint(other) and not shipped.is_shipped_checkpoint(None)
    meta = {"weights": {"sha256": shipped.record()["weights_sha256"]}}
    assert shipped.is_shipped_engine(meta)
    assert not shipped.is_shipped_engine({"weights": {"sha256": "0" * 64}}) and not shipped.is_shipped_engine(None)
    assert shipped.flip_for(meta, True) == (False, shipped.FLIP_NOTICE)
    assert shipped.flip_for(meta, False) == (False, None)
    assert shipped.flip_for({"weights": {"sha256": "0" * 64}}, True) == (True, None)
