"""``splitnet train-lm``: train a built-in LM on Python's standard-library source and report held-out figures."""

from __future__ import annotations

import argparse
import json
import math
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from splitnet.model.builtin import TRAINED_LMS

    p = sub.add_parser("train-lm", help="train stdlib-gpt / stdlib-gpt-draft on Python's stdlib source; print JSON")
    p.add_argument("--name", default="stdlib-gpt", choices=sorted(TRAINED_LMS), help="which recipe (default stdlib-gpt)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's optimizer steps (changes the cache key)")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed (changes the cache key)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default=None, help="write the model here instead of the built-in cache")
    p.add_argument("--force", action="store_true", help="retrain even if the cache already holds this recipe")
    p.add_argument("--draft", default=None, help="also score this draft (built-in or directory) against the model: greedy agreement")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for training (default 1: same weights on every machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from splitnet.errors import SplitnetError
    from splitnet.model import load_model
    from splitnet.model import train_lm

    import torch

    torch.set_num_threads(max(1, args.threads))  # evaluation too: spinning OpenMP threads crawl on a busy host
    try:
        recipe = train_lm.recipe_for(args.name, steps=args.steps, seed=args.seed)
        if args.out:
            corpus = train_lm.stdlib_corpus(holdout_every=recipe.holdout_every)
            print(f"training {args.name} on {corpus.nbytes / 1e6:.1f} MB of stdlib source, ~{max(1, round(recipe.estimate_minutes()))} min, writing {args.out}", file=sys.stderr, flush=True)
            result = train_lm.train(recipe, corpus=corpus, device=args.device, progress=not args.no_progress, name=args.name, threads=args.threads)
            model_dir, metrics = train_lm.save_pretrained(result, args.out), result.metrics
        else:
            model_dir, metrics = train_lm.materialize_trained(args.name, recipe, device=args.device, force=args.force, progress=not args.no_progress, threads=args.threads)
        report = {"name": args.name, "dir": str(model_dir), "recipe_digest": recipe.digest(), "trained": metrics is not None, **recipe.key()}
        corpus = train_lm.stdlib_corpus(holdout_every=recipe.holdout_every)
        windows = train_lm.heldout_windows(corpus, recipe.context_tokens, recipe.eval_tokens)
        model = load_model(str(model_dir))
        loss = train_lm.evaluate(model, windows)  # from the saved files, as every user loads it
        unigram = train_lm.unigram_loss(corpus, windows)
        report["heldout"] = {"loss": round(loss, 4), "ppl": round(math.exp(loss), 3), "bits_per_byte": round(loss / math.log(2), 4),
                             "unigram_loss": round(unigram, 4), "unigram_ppl": round(math.exp(unigram), 3), "tokens": int(windows[:, 1:].numel())}
        if metrics is not None:
            report["training"] = metrics
        if args.draft:
            draft = load_model(args.draft)
            report["draft"] = {"name": args.draft, "heldout_ppl": round(math.exp(train_lm.evaluate(draft, windows)), 3),
                               **train_lm.draft_agreement(model, draft, windows)}
    except SplitnetError as e:
        print(f"splitnet train-lm: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0
