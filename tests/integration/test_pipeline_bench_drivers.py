"""`splitnet bench pipeline`'s decode drivers: N client processes and ONE generate_many process,
reported side by side in one JSON document, both checked against transformers' tokens."""

from __future__ import annotations

import argparse

import pytest

from splitnet.bench import pipeline

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow  # a pipeline, transformers' baseline and four client processes: the slow suite
def test_both_drivers_are_measured_in_one_run(kill_leftovers):
    p = argparse.ArgumentParser()
    pipeline.add_arguments(p)
    args = p.parse_args(["--model", "tiny-gpt2", "--stages", "2", "--concurrency", "1,3", "--new-tokens", "6", "--prompt-tokens", "16",
                         "--chunks", "0", "--repeats", "1", "--decode-prompt-tokens", "8", "--check-sequences", "3"])
    doc = pipeline.run(args)
    assert [d["clients"] for d in doc["decode"]] == [1, 3]
    [many] = doc["decode_many"]
    assert many["sequences"] == 3 and many["client_processes"] == 1 and many["batch_messages"] is True
    assert many["tokens_identical"] == many["tokens_checked"] == 3  # greedy tokens equal transformers'
    assert many["stage_batch_messages_in"][0] > 0 and many["stage_batch_messages_out"][-1] > 0  # the client's batches, the last stage's result batches
    assert doc["summary"]["decode_many_tokens_per_s_3"] == many["tokens_per_s"] and "many_over_clients_3" in doc["summary"]
    assert doc["teacher_forced"]["argmax_agreement"] == 1.0  # through Session.infer(all_logits=True, head="argmax")
    assert set(many["stage_step_ms_sequence_0"]) == {"0", "1"}
    assert "many" in pipeline.summarize(doc)


def test_unknown_drivers_are_refused():
    p = argparse.ArgumentParser()
    pipeline.add_arguments(p)
    with pytest.raises(SystemExit, match="drivers"):
        pipeline.run(p.parse_args(["--drivers", "threads"]))
    with pytest.raises(SystemExit, match="needs 1"):
        pipeline.run(p.parse_args(["--drivers", "many", "--concurrency", "8"]))
