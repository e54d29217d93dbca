"""CUDA graphs of decode steps (splitnet.model.cuda_graphs), on a GPU only: the graphed step gives
the eager step's logits for every member, whatever it is batched with, padded to a bucket, at
different positions, across pool growth; two-stage split included."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from splitnet.model import load_model  # noqa: E402
from tests.unit.test_hf_decoder_families import CASES, _checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("name", ["llama", "mistral-sliding", "gemma2-sliding-softcap", "gemma3-text-sliding", "gpt2-tied", "qwen3"])
def test_graphed_decode_equals_eager(tmp_path_factory, name):
    model_type, over = CASES[name]
    d = _checkpoint(tmp_path_factory, model_type, over)
    bm = load_model(str(d))
    runs = {}
    for graphs in (False, True):
        stages = [bm.stage(0, 2).to("cuda"), bm.stage(2, 4).to("cuda")]
        pools = [s.cache_pool(8) for s in stages]
        if graphs:
            for s, p in zip(stages, pools):
                s.enable_cuda_graphs(p, 8)
        else:
            for s in stages:
                s.__dict__.pop("_graphs", None)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, 97, (1, n), generator=g).cuda() for n in (5, 11, 2)]
        caches = [[p.acquire() for p in pools] for _ in prompts]
        tokens = [[] for _ in prompts]
        logits = []
        for i, (prompt, cs) in enumerate(zip(prompts, caches)):
            x = {"input_ids": prompt}
            for s, c in zip(stages, cs):
                x = s.forward_batch([x], [c])[0]
            tokens[i].append(int(x["logits"][0].argmax()))
        for step in range(40):  # past the 128-position bucket? no: 11 + 40 < 128, see growth below
            members = [0, 1, 2] if step % 3 else [2, 0]  # batch sizes 3 (bucket 4, one padding row) and 2
            xs = [{"input_ids": torch.tensor([[tokens[i][-1]]], device="cuda")} for i in members]
            for j, s in enumerate(stages):
                xs = s.forward_batch(xs, [caches[i][j] for i in members])
            for i, x in zip(members, xs):
                tokens[i].append(int(x["logits"][0].argmax()))
                logits.append(x["logits"].float().cpu())
        runs[graphs] = (tokens, torch.cat(logits))
        if graphs:
            assert stages[1]._graphs.captures >= 2
    assert runs[True][0] == runs[False][0]
    assert (runs[True][1] - runs[False][1]).abs().max().item() <= 1e-3


def test_graphs_survive_pool_growth_and_long_sequences(tmp_path_factory):
    d = _checkpoint(tmp_path_factory, "llama", {})
    st = load_model(str(d)).full().to("cuda")
    ref = load_model(str(d)).full().to("cuda")
    pool, ref_pool = st.cache_pool(16), ref.cache_pool(16)
    st.enable_cuda_graphs(pool, 16)
    prompt = torch.randint(0, 97, (1, 3), generator=torch.Generator().manual_seed(4)).cuda()
    a, b = pool.acquire(), ref_pool.acquire()
    st.forward_batch([{"input_ids": torch.tensor([[1]], device="cuda")}], [pool.acquire()])  # a graph before the first growth
    ta = tb = int(st.forward_batch([{"input_ids": prompt}], [a])[0]["logits"].argmax())
    ref.forward_batch([{"input_ids": prompt}], [b])
    for _ in range(120):  # up to 123 positions: the length bucket and the pool's capacity grow
        ta = int(st.forward_batch([{"input_ids": torch.tensor([[ta]], device="cuda")}], [a])[0]["logits"].argmax())
        tb = int(ref.forward_batch([{"input_ids": torch.tensor([[tb]], device="cuda")}], [b])[0]["logits"].argmax())
        assert ta == tb
    import gc

    gc.collect()  # graphs dropped at a growth are freed before the next capture (their memory pool too)
    more = [pool.acquire() for _ in range(6)]  # more slots: the pool's rows grow, graphs are recaptured
    x = [{"input_ids": torch.tensor([[1]], device="cuda")} for _ in more]
    st.forward_batch(x, more)
    assert pool.rows >= 8 and a.length == 123


def test_prepared_graphs_serve_the_first_steps_without_a_capture(tmp_path_factory):
    """``DecodeGraphs.prepare`` (a stage's warm-up): the buckets it captured serve later steps
    with no capture of their own, and their logits equal the eager step's."""
    d = _checkpoint(tmp_path_factory, "llama", {"max_position_embeddings": 512})
    st = load_model(str(d)).full().to("cuda")
    ref = load_model(str(d)).full().to("cuda")
    pool, ref_pool = st.cache_pool(8), ref.cache_pool(8)
    st.enable_cuda_graphs(pool, 8)
    assert st._graphs.prepare([1, 2, 3, 4], [100, 200], torch.zeros(1, 1, dtype=torch.long, device="cuda")) == 6  # buckets 1, 2, 4 x 128, 256
    captured = st._graphs.captures
    prompts = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)).cuda() for n in (30, 150, 90)]
    cs, rs = [pool.acquire() for _ in prompts], [ref_pool.acquire() for _ in prompts]
    for p, c, r in zip(prompts, cs, rs):
        st.forward_batch([{"input_ids": p}], [c])
        ref.forward_batch([{"input_ids": p}], [r])
    for members in ([0], [0, 2], [0, 1, 2], [1]):
        xs = [{"input_ids": torch.tensor([[5 + i]], device="cuda")} for i in members]
        got = st.forward_batch(xs, [cs[i] for i in members])
        want = ref.forward_batch(xs, [rs[i] for i in members])
        for g, w in zip(got, want):
            assert (g["logits"].float() - w["logits"].float()).abs().max().item() <= 1e-3
    assert st._graphs.captures == captured  # every step above fell in a prepared bucket
