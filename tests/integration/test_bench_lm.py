"""`splitnet bench lm --quick` on a tiny LM trained here: the JSON's fields, fidelity measured on
held-out files only, and the split path's own correctness (fp32 across the cut equals the unsplit model)."""

from __future__ import annotations

import json

import pytest

from splitnet.model import train_lm

TINY = dict(n_layer=2, n_embd=32, n_head=2, context_tokens=80, steps=25, batch_size=8, lr=1e-2, warmup_steps=3, eval_tokens=2048,
            holdout_every=4)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    corpus = train_lm.stdlib_corpus(holdout_every=TINY["holdout_every"], max_bytes=400_000)
    result = train_lm.train(train_lm.LMRecipe(**TINY), corpus=corpus, progress=False)
    return train_lm.save_pretrained(result, tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def doc(tiny_lm, tmp_path_factory):
    from splitnet.cli import main

    out = tmp_path_factory.mktemp("bench") / "lm.json"
    rc = main(["bench", "lm", "--quick", "--json", "--no-progress", "--model", str(tiny_lm), "--cuts", "1", "--prompt-tokens", "16",
               "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_fidelity_is_measured_on_held_out_files_only(doc):
    d = doc["data"]
    held = {p.relative_to(d["stdlib_root"]).as_posix() for p in train_lm.heldout_files(d["stdlib_root"], TINY["holdout_every"])}
    assert d["calibration_files"] and d["evaluation_files"]
    assert set(d["evaluation_files"]) <= held
    assert not set(d["calibration_files"]) & held
    assert d["files_shared_by_calibration_and_evaluation"] == []


def test_json_fields_and_byte_accounting(doc):
    assert doc["suite"] == "lm" and doc["environment"]["cpu_count"] >= 1
    assert {"greedy_positional_agreement", "greedy_identical_continuations", "message_bytes", "payload_bytes"} <= set(doc["definitions"])
    rows = {r["setting"]: r for r in doc["results"]}
    assert set(rows) == {"fp32", "fp16", "int8", "rvq:stages=2/nbits=6", "alignedvq:stages=2/nbits=6/anchors=1"}
    for r in rows.values():
        g = r["greedy"]
        assert g["prompts"] == 4 and g["new_tokens"] == 32
        assert 0.0 <= g["identical_continuations"] <= g["common_prefix_fraction"] <= g["positional_agreement"] <= 1.0
        for phase in ("prefill", "decode"):
            b = r["bytes"][phase]
            assert b["message_per_token"] > b["payload_per_token"] > b["data_per_token"] > 0
        assert isinstance(r["meets_bar"], bool) and isinstance(r["pareto"], bool)
    # int8 sends, per token, one byte per channel and an fp16 (min, step) pair: 32 + 4 bytes of data
    assert rows["int8"]["bytes"]["decode"]["data_per_token"] == 36
    assert rows["fp16"]["bytes"]["decode"]["data_per_token"] == 64
    assert rows["fp16"]["ratio_vs_fp16"]["decode_payload"] == 1.0
    # rvq 2x6: 12 bits per token, bit-packed: 2 bytes for one decoded token
    assert rows["rvq:stages=2/nbits=6"]["bytes"]["decode"]["data_per_token"] == 2
    # decode steps go compact (meta.cc = [1, bytes]: key 3 + array 1 + count 1 + bin header 2) where the
    # codec has one part and no side information; int8 (values + scales) keeps its full entry
    for name in ("fp32", "fp16", "rvq:stages=2/nbits=6"):
        d = rows[name]["bytes"]["decode"]
        assert d["compact_fraction"] == 1.0 and d["payload_per_token"] - d["data_per_token"] == 7, name
    assert rows["int8"]["bytes"]["decode"]["compact_fraction"] == 0.0
    assert rows["int8"]["bytes"]["decode"]["payload_per_token"] - rows["int8"]["bytes"]["decode"]["data_per_token"] > 30
    assert rows["rvq:stages=2/nbits=6"]["calibration_vectors"] == 24 * 80
    cloud = doc["baseline_cloud_only"]
    assert cloud["decode_message_bytes_per_token"] > 8 and cloud["text_bytes_per_token"] > 0
    assert doc["goal"]["bar"].startswith(">= 8x") and isinstance(doc["alignedvq_place"], list)
    assert [a["setting"] for a in doc["alignedvq_place"]] == ["alignedvq:stages=2/nbits=6/anchors=1"]


def test_fp32_across_the_cut_equals_the_unsplit_model(doc):
    """The split path (edge cache, wire frames, cloud cache) changes nothing when nothing is lost."""
    r = next(r for r in doc["results"] if r["setting"] == "fp32")
    assert r["greedy"]["positional_agreement"] == 1.0 and r["greedy"]["identical_continuations"] == 1.0
    assert abs(r["perplexity"]["change_pct"]) < 1e-3 and r["teacher_forced_argmax_agreement"] == 1.0
    assert r["cut_cosine"] > 0.99999


def test_rvq_settings_that_differ_in_stages_share_the_deepest_fit():
    from splitnet.bench.lm import _nested_rvq, _settings

    settings = _settings("fp16,rvq:stages=8/nbits=8,rvq:stages=40/nbits=8,rvq:stages=4/nbits=6,pq:m=8/nbits=8")
    assert _nested_rvq(settings) == {"rvq:stages=8/nbits=8": "rvq:stages=40/nbits=8", "rvq:stages=40/nbits=8": "rvq:stages=40/nbits=8",
                                     "rvq:stages=4/nbits=6": "rvq:stages=4/nbits=6"}
    with pytest.raises(ValueError, match="anchors=1 applies to alignedvq only"):
        _settings("rvq:stages=2/nbits=8/anchors=1")
    with pytest.raises(ValueError, match="unknown codec"):
        _settings("nope")


def test_truncated_rvq_equals_a_fit_with_fewer_stages():
    """What lets one 40-stage fit stand for the 8-, 16- and 32-stage rows."""
    import numpy as np

    from splitnet.codecs import make_codec

    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    deep = make_codec("rvq", stages=4, nbits=4).fit(x, progress=False)
    shallow = make_codec("rvq", stages=2, nbits=4).fit(x, progress=False)
    np.testing.assert_allclose(deep.truncated(2).codebooks, shallow.codebooks, rtol=1e-5, atol=1e-5)
