"""The learned (distilled) transform codec: round trip, state without pickle, refusals."""

import numpy as np
import pytest
import torch

from splitnet.codecs import make_codec
from splitnet.codecs.registry import known_codecs
from splitnet.codecs.store import load_codec, save_codec
from splitnet.errors import CodecError


class _Tail(torch.nn.Module):
    """A stand-in tail: (B, T, C) -> mean over positions -> linear logits (the hooks _tail_logits uses)."""

    def __init__(self, c: int, k: int = 10):
        super().__init__()
        self.fc = torch.nn.Linear(c, k)
        self.blocks, self.start = [], 0
        outer = self

        class _Arch:
            def context(self, inputs, past, h):
                return None

        class _Head(torch.nn.Module):
            def forward(self, h, ctx):
                return {"logits": outer.fc(h.mean(1))}

        self.arch, self.head = _Arch(), _Head()

    def hidden_input(self, inputs):
        return inputs["hidden"]


def _maps(n=24, side=4, c=8, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 1, c)).astype(np.float32)
    return (base + 0.3 * rng.normal(size=(n, side * side, c))).astype(np.float32)


def _fit(epochs=2, **kw):
    torch.manual_seed(0)
    maps = _maps()
    metric = np.eye(maps.shape[-1])
    codec = make_codec("learned", epochs=epochs, batch=8, **kw)
    return codec.fit(maps, progress=False, tail=_Tail(maps.shape[-1]), channel_metric=metric, frequency_weights=np.ones(16)), maps


def test_registered():
    assert "learned" in known_codecs()


def test_round_trip_and_training_changes_steps():
    trained, maps = _fit(epochs=3, lr=0.05)
    plain, _ = _fit(epochs=0)
    assert not np.allclose(trained.steps, plain.steps)  # the steps were learned
    held = _maps(n=4, seed=1)
    p = trained.encode(held)
    out = trained.decode(p)
    assert out.shape == held.shape and out.dtype == np.float32
    assert p.nbytes > 0 and set(p.parts) == {"r"}
    cos = (held * out).sum(-1) / (np.linalg.norm(held, axis=-1) * np.linalg.norm(out, axis=-1) + 1e-9)
    assert cos.mean() > 0.5


def test_save_load_same_bytes(tmp_path):
    codec, _ = _fit()
    save_codec(codec, tmp_path / "l.codec")
    back = load_codec(tmp_path / "l.codec")
    x = _maps(n=2, seed=3)
    assert back.codebook_hash == codec.codebook_hash
    np.testing.assert_array_equal(back.decode(codec.encode(x)), codec.decode(codec.encode(x)))


def test_fit_without_tail_or_model_refuses():
    with pytest.raises(CodecError):
        make_codec("learned").fit(_maps(), progress=False)


@pytest.mark.parametrize("bad", [{"lam": -1}, {"epochs": -1}, {"lr": 0}, {"model": 3}, {"step": 0}])
def test_bad_settings(bad):
    with pytest.raises(ValueError):
        make_codec("learned", **bad)
