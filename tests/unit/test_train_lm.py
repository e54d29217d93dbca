"""Training the built-in LMs on stdlib source: loss goes down, save/load round trip, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from splitnet.errors import ConfigError
from splitnet.model import BUILTIN_MODELS, load_model
from splitnet.model import train_lm
from splitnet.model.tokenizer import ByteTokenizer

TINY = dict(n_layer=2, n_embd=32, n_head=2, context_tokens=32, steps=25, batch_size=8, lr=1e-2, warmup_steps=3, eval_tokens=2048, holdout_every=4)


@pytest.fixture(scope="module")
def corpus():
    return train_lm.stdlib_corpus(holdout_every=4, max_bytes=400_000)


@pytest.fixture(scope="module")
def trained(corpus):
    return train_lm.train(train_lm.LMRecipe(**TINY), corpus=corpus, progress=False)


def test_corpus_is_deterministic_disjoint_and_eos_separated(corpus):
    files = train_lm.stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and files
    assert not any(part in train_lm.EXCLUDED_DIRS for p in files for part in p.parts[-2:-1])
    again = train_lm.stdlib_corpus(holdout_every=4, max_bytes=400_000)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.heldout, corpus.heldout)
    assert corpus.train_files > corpus.heldout_files > 0
    # one EOS after each file, bytes otherwise
    assert int((corpus.train == ByteTokenizer.eos_id).sum()) == corpus.train_files
    assert int((corpus.heldout == ByteTokenizer.eos_id).sum()) == corpus.heldout_files
    assert int(corpus.train.max()) == 256 and int(corpus.train.min()) >= 0


def test_training_lowers_heldout_loss(trained):
    m = trained.metrics
    assert m["heldout_loss"] < m["initial_heldout_loss"] - 1.0
    assert m["initial_heldout_loss"] == pytest.approx(torch.log(torch.tensor(257.0)).item(), abs=0.2)  # ~uniform at init
    assert m["train_tokens"] == 25 * 8 * 32 and m["eval_tokens"] > 0


def test_save_load_round_trip_gives_identical_logits(trained, corpus, tmp_path):
    out = train_lm.save_pretrained(trained, tmp_path / "lm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["splitnet_recipe_digest"] == trained.recipe.digest() and cfg["splitnet_tokenizer"] == "bytes"
    bm = load_model(str(out))
    assert (bm.kind, bm.num_blocks, bm.hidden_size) == ("decoder", 2, 32)
    assert isinstance(bm.tokenizer, ByteTokenizer)
    ids = train_lm.heldout_windows(corpus, 32, 256)[:, :-1]
    with torch.no_grad():
        expected = trained.model(ids)
    # served by transformers' GPT-2 modules, trained with splitnet's: the same function to float error
    assert torch.allclose(bm.full()({"input_ids": ids}, all_logits=True)["logits"], expected, atol=1e-5)
    # split in two stages with KV caches, prompt in two chunks: same last-token logits
    s0, s1 = bm.stage(0, 1), bm.stage(1, 2)
    c0, c1 = s0.new_cache(), s1.new_cache()
    s1(s0({"input_ids": ids[:1, :20]}, c0), c1)
    last = s1(s0({"input_ids": ids[:1, 20:]}, c0), c1)["logits"]
    assert torch.allclose(last, expected[:1, -1], atol=1e-5)
    assert train_lm.evaluate(bm, train_lm.heldout_windows(corpus, 32, 512)) == pytest.approx(
        train_lm.evaluate(trained.model, train_lm.heldout_windows(corpus, 32, 512)), abs=1e-5)


def test_tokenizer_json_matches_byte_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text(train_lm.byte_tokenizer_json())
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "def f(x):\n    return 'é€\\t'  # ünïcode \x00"
    assert tok.encode(text).ids == ByteTokenizer().encode(text)
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<|endoftext|>") == ByteTokenizer.eos_id


def test_same_seed_same_weights_other_seed_differs(corpus):
    r = train_lm.LMRecipe(**{**TINY, "steps": 4})
    a = train_lm.train(r, corpus=corpus, progress=False).model.checkpoint_tensors()
    b = train_lm.train(r, corpus=corpus, progress=False).model.checkpoint_tensors()
    c = train_lm.train(train_lm.LMRecipe(**{**TINY, "steps": 4, "seed": 1}), corpus=corpus, progress=False).model.checkpoint_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_draft_and_target_share_vocab_and_tokenizer():
    assert {"stdlib-gpt", "stdlib-gpt-draft"} <= BUILTIN_MODELS
    target, draft = train_lm.recipe_for("stdlib-gpt"), train_lm.recipe_for("stdlib-gpt-draft")
    ct, cd = target.model_config(), draft.model_config()
    for key in ("vocab_size", "splitnet_tokenizer", "eos_token_id", "bos_token_id", "model_type"):
        assert ct[key] == cd[key]
    assert ct["n_positions"] <= cd["n_positions"]  # the draft can follow any context the target takes
    assert target.num_params() > 4 * draft.num_params()
    assert target.digest() != draft.digest()


def test_recipe_digest_tracks_recipe_and_validates():
    r = train_lm.recipe_for("stdlib-gpt")
    assert r.digest() == train_lm.recipe_for("stdlib-gpt").digest()
    assert r.digest() != train_lm.recipe_for("stdlib-gpt", steps=r.steps + 1).digest()
    assert train_lm.trained_dir("stdlib-gpt").name == f"stdlib-gpt-{r.digest()}"
    with pytest.raises(ConfigError, match="multiple of n_head"):
        train_lm.LMRecipe(n_embd=100, n_head=3)
    with pytest.raises(ConfigError, match="steps"):
        train_lm.LMRecipe(steps=0)
    with pytest.raises(ConfigError, match="unknown trained LM"):
        train_lm.recipe_for("nope")
    with pytest.raises(ConfigError, match="cuda"):
        if torch.cuda.is_available():
            raise ConfigError("cuda present; nothing to check")
        train_lm.train(train_lm.LMRecipe(**TINY), device="cuda", progress=False)


def test_materialize_trains_once_then_uses_cache(corpus, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SPLITNET_HOME", str(tmp_path))
    monkeypatch.setattr(train_lm, "stdlib_corpus", lambda **kw: corpus)
    recipe = train_lm.LMRecipe(**{**TINY, "steps": 3})
    path, metrics = train_lm.materialize_trained("stdlib-gpt-draft", recipe, progress=False)
    assert metrics is not None and path == tmp_path / "models" / f"stdlib-gpt-draft-{recipe.digest()}"
    assert "training stdlib-gpt-draft on" in capsys.readouterr().err
    again, metrics2 = train_lm.materialize_trained("stdlib-gpt-draft", recipe, progress=False)
    assert again == path and metrics2 is None
    assert json.loads((path / "splitnet_train.json").read_text())["digest"] == recipe.digest()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".stdlib-gpt-draft-") and p.is_dir()]  # no temp dirs left


def test_draft_agreement_of_a_model_with_itself(trained, corpus):
    w = train_lm.heldout_windows(corpus, 32, 512)
    a = train_lm.draft_agreement(trained.model, trained.model, w)
    assert a["greedy_agreement"] == 1.0 and a["expected_acceptance"] == pytest.approx(1.0, abs=1e-5)


def test_cli_registers_train_lm():
    from splitnet.cli import build_parser

    args = build_parser().parse_args(["train-lm", "--name", "stdlib-gpt-draft", "--steps", "5", "--out", "/tmp/x"])
    assert (args.name, args.steps, args.out, args.device) == ("stdlib-gpt-draft", 5, "/tmp/x", "cpu")


@pytest.mark.slow
def test_builtin_stdlib_gpt_beats_unigram():
    """Trains (or reuses) the real built-ins: minutes on a CPU."""
    bm, draft = load_model("stdlib-gpt"), load_model("stdlib-gpt-draft")
    recipe = train_lm.recipe_for("stdlib-gpt")
    corpus = train_lm.stdlib_corpus(holdout_every=recipe.holdout_every)
    w = train_lm.heldout_windows(corpus, recipe.context_tokens, 16384)
    unigram = train_lm.unigram_loss(corpus, w)
    assert train_lm.evaluate(bm, w) < train_lm.evaluate(draft, w) < unigram - 0.5
    assert train_lm.draft_agreement(bm, draft, w)["greedy_agreement"] > 0.5


def test_loading_an_untrained_builtin_says_to_train_it(tmp_path, monkeypatch):
    from splitnet.errors import ModelLoadError

    monkeypatch.setenv("SPLITNET_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="splitnet train-lm --name stdlib-gpt-draft"):
        load_model("stdlib-gpt-draft")  # training is an explicit step, never a side effect of loading
    assert not any(tmp_path.rglob("*.safetensors"))
