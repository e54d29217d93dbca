"""Text for ``splitnet bench lm``: calibration windows from the LM's training files, evaluation
windows and prompts from its held-out files.

A model made by ``splitnet train-lm`` records its recipe (``splitnet_train.json``), and with it
``holdout_every``: which stdlib files it was trained on and which it never saw
(:func:`splitnet.model.train_lm.heldout_files`). Codecs are calibrated on windows of the training
files only; perplexity windows and generation prompts come from the held-out files only, so no
fidelity figure is measured on calibration text. Both file lists are returned, and the bench
checks they share no file.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitnet.errors import ConfigError


@dataclass(frozen=True)
class LMData:
    """Token windows (int64) for one bench run, and where they came from.

    Attributes:
        calibration: (N, T) windows of training files; codecs are fitted on their cut features.
        perplexity: (E, T) windows of held-out files, scored teacher-forced.
        prompts: (G, P) prompts from held-out files, each continued greedily.
        calibration_files / evaluation_files: stdlib-relative paths the windows were cut from.
        holdout_every: the model's recipe's split (one file in this many held out).
        stdlib_root: where the files were read.
    """

    calibration: np.ndarray
    perplexity: np.ndarray
    prompts: np.ndarray
    calibration_files: list[str]
    evaluation_files: list[str]
    holdout_every: int
    stdlib_root: str
    trained_python: str | None


def model_recipe(model_dir: Path | None) -> dict:
    """The training record ``splitnet train-lm`` wrote beside the weights, or a ConfigError."""
    record = (Path(model_dir) / "splitnet_train.json") if model_dir is not None else None
    if record is None or not record.is_file():
        raise ConfigError(f"bench lm needs an LM made by `splitnet train-lm` (its splitnet_train.json names the files it was trained on); "
                          f"{model_dir} has none. Use --model stdlib-gpt or a directory written by train-lm")
    return json.loads(record.read_text())


def _windows(files: list[Path], encode, n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Path]]:
    """``n`` windows of ``length`` tokens at random offsets of files drawn in proportion to their
    length (files shorter than one window are skipped)."""
    toks = {f: None for f in files}
    sizes = np.array([f.stat().st_size for f in files], dtype=np.float64)
    sizes[sizes <= length + 1] = 0.0
    if not sizes.sum():
        raise ConfigError(f"no file of {len(files)} is longer than {length} tokens")
    out = np.empty((n, length), dtype=np.int64)
    used: set[Path] = set()
    row = 0
    while row < n:
        f = files[int(rng.choice(len(files), p=sizes / sizes.sum()))]
        if toks[f] is None:
            toks[f] = np.asarray(encode(f.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
        ids = toks[f]
        if ids.size <= length:  # fewer tokens than bytes on disk: never pick it again
            sizes[files.index(f)] = 0.0
            if not sizes.sum():
                raise ConfigError(f"no file of {len(files)} is longer than {length} tokens")
            continue
        start = int(rng.integers(0, ids.size - length))
        out[row] = ids[start : start + length]
        used.add(f)
        row += 1
    return out, sorted(used)


def lm_data(bm, *, context_tokens: int, calibration_windows: int, perplexity_windows: int, prompts: int, prompt_tokens: int,
            seed: int = 0, stdlib_root: str | Path | None = None) -> LMData:
    """Windows for ``bm`` (a decoder trained by train-lm): see :class:`LMData`."""
    from splitnet.model import train_lm

    record = model_recipe(bm.model_dir)
    holdout_every = int(record.get("recipe", {}).get("holdout_every", 0))
    if holdout_every < 2:
        raise ConfigError(f"{bm.model_dir}/splitnet_train.json names no holdout_every; retrain with `splitnet train-lm`")
    root = Path(stdlib_root or sysconfig.get_paths()["stdlib"])
    every = train_lm.stdlib_files(root)
    held = train_lm.heldout_files(root, holdout_every)
    held_set = set(held)
    train = [f for f in every if f not in held_set]
    if not held or not train:
        raise ConfigError(f"{root}: {len(train)} training and {len(held)} held-out files; both are needed")
    if bm.tokenizer is None:
        raise ConfigError(f"{bm.name} has no tokenizer; bench lm reads text")
    rng = np.random.default_rng(seed)
    cal, cal_used = _windows(train, bm.tokenizer.encode, calibration_windows, context_tokens, rng)
    ppl, ppl_used = _windows(held, bm.tokenizer.encode, perplexity_windows, context_tokens, rng)
    pr, pr_used = _windows(held, bm.tokenizer.encode, prompts, prompt_tokens, rng)
    rel = lambda fs: [f.relative_to(root).as_posix() for f in fs]  # noqa: E731
    return LMData(cal, ppl, pr, rel(cal_used), rel(sorted(set(ppl_used) | set(pr_used))), holdout_every, str(root),
                  record.get("python"))


def python_matches(data: LMData) -> bool:
    """Whether this interpreter's stdlib is the one the model was trained on (same minor version)."""
    return data.trained_python in (None, "%d.%d" % sys.version_info[:2])
