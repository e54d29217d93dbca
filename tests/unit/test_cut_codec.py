"""What crosses a cut: packed real tokens, compact masks, codec lookup by hash."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitnet.errors import CodecError
from splitnet.runtime.cut_codec import CutCodecs


def _roundtrip(cc_out: CutCodecs, cc_in: CutCodecs, outputs):
    tensors, meta = cc_out.encode(outputs)
    return tensors, meta, cc_in.decode({k: np.asarray(v) for k, v in tensors.items()}, meta)


@pytest.mark.parametrize("codec", ["", "fp16"])
def test_right_padded_mask_travels_as_lengths(codec):
    h = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    tensors, meta, back = _roundtrip(CutCodecs(codec), CutCodecs(), {"hidden": h, "attention_mask": mask})
    assert "attention_mask" not in tensors and tensors["lengths"].tolist() == [5, 2, 1]
    assert back["attention_mask"].dtype == np.int64 and np.array_equal(back["attention_mask"], mask.numpy())
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(back["hidden"][real], h.numpy()[real], atol=2e-3)
    if codec:  # only real tokens were encoded
        assert meta["packed_tokens"] and back["hidden"].shape == (3, 5, 8) and not back["hidden"][~real].any()


def test_other_masks_travel_as_bytes():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding
    tensors, _, back = _roundtrip(CutCodecs(), CutCodecs(), {"hidden": torch.zeros(2, 3, 4), "attention_mask": mask})
    assert tensors["attention_mask"].dtype == np.uint8
    assert np.array_equal(back["attention_mask"], mask.numpy())


def test_bad_lengths_are_refused():
    with pytest.raises(CodecError, match="mask_len"):
        CutCodecs().decode({"hidden": np.zeros((1, 2, 4), np.float32), "lengths": np.array([3], np.int32)}, {"mask_len": 2})


def test_mask_without_padding_is_not_sent_and_the_stage_assumes_it():
    from splitnet.model import load_model

    bm = load_model("minilm")
    batch = bm.tokenize(["no padding here"])
    h = bm.stage(0, 3)(batch)
    tensors, meta = CutCodecs().encode(h)
    assert set(tensors) == {"hidden"}
    back = CutCodecs().decode({k: np.asarray(v) for k, v in tensors.items()}, meta)
    out = bm.stage(3, 6)({k: torch.from_numpy(np.array(v)) for k, v in back.items()})["embedding"]
    assert torch.allclose(out, bm.full()(batch)["embedding"], atol=1e-6)
