"""Batched forwards over a stage's slot cache (splitnet.model.slot_cache), every decoder family:
several requests at different positions decode in one forward, each member's logits and greedy
tokens equal transformers' for that request alone, and what a request is batched with (or the
slot it lands in, or a stale row's content) never changes its tokens."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from splitnet.errors import LimitExceeded, StageError  # noqa: E402
from splitnet.model import load_model  # noqa: E402
from tests.unit.test_hf_decoder_families import CASES, _checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_type, over = CASES[request.param]
    d = _checkpoint(tmp_path_factory, model_type, over)
    return request.param, d, transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def _prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 97, (1, n), generator=g) for n in (9, 3, 14)]


def _greedy_batched(stages, pools, prompts, n_new, order=None):
    """Prefill each prompt alone, then decode all of them in one forward per step per stage."""
    caches = [[p.acquire() for p in pools] for _ in prompts]
    last = []
    for prompt, cs in zip(prompts, caches):
        x = {"input_ids": prompt}
        for s, c in zip(stages, cs):
            x = s.forward_batch([x], [c])[0]
        last.append(int(x["logits"][0].argmax()))
    out = [[t] for t in last]
    members = order or list(range(len(prompts)))
    for _ in range(n_new - 1):
        xs = [{"input_ids": torch.tensor([[out[i][-1]]])} for i in members]
        for j, s in enumerate(stages):
            xs = s.forward_batch(xs, [caches[i][j] for i in members])
        for i, x in zip(members, xs):
            out[i].append(int(x["logits"][0].argmax()))
    return out, caches


def test_batched_decode_equals_transformers_alone(case):
    name, d, ref = case
    bm = load_model(str(d))
    stages = [bm.stage(0, 2), bm.stage(2, 4)]
    pools = [s.cache_pool(8) for s in stages]
    prompts = _prompts()
    got, _ = _greedy_batched(stages, pools, prompts, 12)
    for prompt, tokens in zip(prompts, got):
        expected = ref.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
        assert tokens == expected, name


def test_batched_logits_match_one_request_at_a_time(case):
    _, d, ref = case
    st = load_model(str(d)).full()
    pool = st.cache_pool(4)
    prompts = _prompts()
    caches = [pool.acquire() for _ in prompts]
    for p, c in zip(prompts, caches):
        st.forward_batch([{"input_ids": p}], [c])
    nxt = [torch.tensor([[5]]), torch.tensor([[7]]), torch.tensor([[9]])]
    batched = st.forward_batch([{"input_ids": t} for t in nxt], caches)
    for p, t, out in zip(prompts, nxt, batched):
        with torch.no_grad():
            expected = ref(torch.cat([p, t], 1)).logits[:, -1]
        assert (out["logits"] - expected).abs().max().item() <= 1e-4


def test_isolation_partners_slots_and_stale_rows_do_not_change_tokens(tmp_path_factory):
    d = _checkpoint(tmp_path_factory, "gemma2", {"sliding_window": 6, "head_dim": 16, "query_pre_attn_scalar": 16})
    st = load_model(str(d)).full()
    prompts = _prompts()
    alone = [_greedy_batched([st], [st.cache_pool(4)], [p], 10)[0][0] for p in prompts]
    together, _ = _greedy_batched([st], [st.cache_pool(4)], prompts, 10)
    assert together == alone
    # non-consecutive slots (a gather, not a view), a reversed batch order, and rows a finished
    # request filled with NaN before a new one took them
    pool = st.cache_pool(8)
    spoilt = [pool.acquire() for _ in range(5)]
    _greedy_batched([st], [pool], [torch.randint(0, 97, (1, 20))] * 1, 3)
    for c in spoilt:
        for layer in pool.keys:
            pool.keys[layer][c.slot].fill_(float("nan"))
            pool.values[layer][c.slot].fill_(float("nan"))
    for c in spoilt[::2]:
        c.close()  # slots 0, 2, 4 free again (and zeroed when handed out)
    got, caches = _greedy_batched([st], [pool], prompts, 10, order=[2, 1, 0])
    assert sorted(c[0].slot for c in caches) == [0, 2, 4]
    assert got == alone


def test_rewind_in_a_slot_matches_a_fresh_request(tmp_path_factory):
    d = _checkpoint(tmp_path_factory, "llama", {})
    st = load_model(str(d)).full()
    pool = st.cache_pool(2)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    c = pool.acquire()
    st.forward_batch([{"input_ids": ids}], [c])
    c.truncate(8)  # four speculative tokens rejected
    got = st.forward_batch([{"input_ids": ids[:, 8:10]}], [c], all_logits=True)[0]["logits"]
    fresh = st.forward_batch([{"input_ids": ids[:, :10]}], [pool.acquire()], all_logits=True)[0]["logits"][:, 8:]
    assert c.length == 10 and (got - fresh).abs().max() <= 1e-5


def test_pool_limits_are_typed_errors(tmp_path_factory):
    d = _checkpoint(tmp_path_factory, "llama", {})
    st = load_model(str(d)).full()
    pool = st.cache_pool(2)
    a, b = pool.acquire(), pool.acquire()
    with pytest.raises(LimitExceeded, match="all 2 KV cache slots"):
        pool.acquire()
    b.close()
    assert pool.acquire().slot == b.slot
    with pytest.raises(StageError, match="exceeds max_position_embeddings=128"):
        st.forward_batch([{"input_ids": torch.zeros(1, 129, dtype=torch.long)}], [a])
    with pytest.raises(StageError, match="of the same tensors"):
        st.forward_batch([{"input_ids": torch.zeros(1, 3, dtype=torch.long)}, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}], [a, b])
    with pytest.raises(StageError, match="same number of tokens"):
        st.stacked_input([{"input_ids": torch.zeros(1, 3, dtype=torch.long)}, {"input_ids": torch.zeros(1, 2, dtype=torch.long)}], 97)


def test_ragged_members_in_one_forward_equal_each_alone(case):
    """Prompt chunks of different lengths after different cached lengths (several requests
    replaying at once) run as one padded forward: every member's logits at the last position, at
    every position, and the hidden states a first stage sends on equal transformers' for that
    request alone, and so do the next decode steps batched over the caches the padded forward
    wrote (its padding never read)."""
    name, d, ref = case
    bm = load_model(str(d))
    first, rest = bm.stage(0, 2), bm.stage(2, 4)
    pools = [first.cache_pool(4), rest.cache_pool(4)]
    g = torch.Generator().manual_seed(3)
    heads = [torch.randint(0, 97, (1, n), generator=g) for n in (5, 0, 11)]  # cached before the ragged step
    chunks = [torch.randint(0, 97, (1, n), generator=g) for n in (7, 12, 2)]
    caches = [[p.acquire() for p in pools] for _ in heads]
    for h, cs in zip(heads, caches):
        if h.shape[1]:
            first.forward_batch([{"input_ids": h}], [cs[0]])
            rest.forward_batch([first.forward_batch([{"input_ids": h}], [first.cache_pool(1).acquire()])[0]], [cs[1]])
    hidden = first.forward_batch([{"input_ids": c} for c in chunks], [cs[0] for cs in caches])
    assert [x["hidden"].shape[1] for x in hidden] == [7, 12, 2]
    outs = rest.forward_batch(hidden, [cs[1] for cs in caches], all_logits=True)
    with torch.no_grad():
        for h, c, x, out in zip(heads, chunks, hidden, outs):
            full = torch.cat([h, c], 1)
            expected = ref(full).logits[:, h.shape[1]:]
            assert out["logits"].shape == expected.shape, name
            assert (out["logits"] - expected).abs().max().item() <= 1e-4, name
    assert [cs[0].length for cs in caches] == [12, 12, 13] == [cs[1].length for cs in caches]
    nxt = [torch.tensor([[5]]), torch.tensor([[7]]), torch.tensor([[9]])]
    lasts = rest.forward_batch(first.forward_batch([{"input_ids": t} for t in nxt], [cs[0] for cs in caches]), [cs[1] for cs in caches])
    with torch.no_grad():
        for h, c, t, out in zip(heads, chunks, nxt, lasts):
            expected = ref(torch.cat([h, c, t], 1)).logits[:, -1]
            assert (out["logits"] - expected).abs().max().item() <= 1e-4, name
    # last-position logits only (the ragged gather of each member's own last position)
    st = bm.full()
    pool = st.cache_pool(3)
    got = st.forward_batch([{"input_ids": c} for c in chunks], [pool.acquire() for _ in chunks])
    with torch.no_grad():
        for c, out in zip(chunks, got):
            assert (out["logits"] - ref(c).logits[:, -1]).abs().max().item() <= 1e-4, name


def test_cacheless_members_are_stacked_and_split(tmp_path_factory):
    d = _checkpoint(tmp_path_factory, "qwen2", {})
    st = load_model(str(d)).full()
    xs = [{"input_ids": torch.randint(0, 97, (n, 6))} for n in (1, 2, 1)]
    outs = st.forward_batch(xs, None)
    for x, out in zip(xs, outs):
        assert (out["logits"] - st(x)["logits"]).abs().max() <= 1e-5


def test_step_rhythms_expect_requests_that_keep_their_rhythm():
    from splitnet.runtime.batching import StepRhythms

    r = StepRhythms(active_s=1.0, patience=2.0)
    for t in (0.0, 0.01, 0.02):
        r.note("a", t)
        r.note("b", t)
    r.note("a", 0.03)
    assert r.expected(0.035) == {"a", "b"}  # b is 15 ms late on a 10 ms rhythm: still expected
    assert r.expected(0.045) == {"a"}  # b is 25 ms late, > 2 intervals: not waited for
    r.note("c", 0.05)  # one step only: no rhythm yet, expected until active_s
    assert "c" in r.expected(0.9)
    assert r.expected(2.0) == set() and len(r) == 0  # idle past active_s: forgotten
    r.note("d", 0.0)
    r.drop("d")
    assert "d" not in r.expected(0.0)


def test_first_stage_waits_for_decode_steps_only_behind_a_decode_step():
    """The first stage's straggler wait is for one-token steps that would stack with the oldest
    member; behind a prompt chunk (a prefill or a replay) there is nothing to wait for."""
    from collections import deque

    import numpy as np

    from splitnet.runtime.worker import _oldest_is_chunk, _Work
    from splitnet.wire import Message

    def work(kind: str, tokens: int) -> _Work:
        return _Work(Message(kind=kind, req="r", tensors={"input_ids": np.zeros((1, tokens), np.int64)}), 0, 0.0)

    assert _oldest_is_chunk(deque([work("release", 1), work("forward", 8), work("forward", 1)]))
    assert not _oldest_is_chunk(deque([work("forward", 1), work("forward", 8)]))
    assert not _oldest_is_chunk(deque())
