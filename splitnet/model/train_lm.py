"""Train a small GPT-2-architecture language model on the source of Python's own standard library.

The built-ins ``stdlib-gpt`` (target) and ``stdlib-gpt-draft`` (draft for speculative decoding)
are made by :func:`materialize_trained` on first use: the recipe (sizes, steps, learning rate,
seed, data selection, Python version) is hashed into the cache directory name, so a changed recipe
trains a new model instead of reusing a stale one.

Data: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` except tests, ``encodings``
(generated code tables) and ``site-packages``, in sorted path order; one file in ``holdout_every``
(chosen by a hash of its relative path, so the split is stable when files are added) is held out
for evaluation. Files are joined with the end-of-text token. Tokens are UTF-8 bytes
(:class:`~splitnet.model.tokenizer.ByteTokenizer`, vocabulary 257), so target and draft always
share a tokenizer.

The model is built from the project's own GPT-2 blocks (:mod:`splitnet.model.gpt2`) and saved as a
Hugging Face directory (config.json + model.safetensors + tokenizer.json) with the same tensor
names as ``GPT2LMHeadModel``; :func:`splitnet.model.load_model` and transformers both read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from splitnet.errors import ConfigError
from splitnet.model.gpt2 import GPT2Architecture
from splitnet.model.tokenizer import ByteTokenizer

#: bump when the training code changes in a way that changes the weights it produces
TRAINER_VERSION = 1
#: directory names never read as training text
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"})
_EOS = ByteTokenizer.eos_id
_VOCAB = ByteTokenizer.vocab_size


@dataclass(frozen=True)
class LMRecipe:
    """Everything that decides the weights of a trained LM (hashed into its cache key)."""

    n_layer: int = 6  #: transformer blocks
    n_embd: int = 192  #: width of the residual stream
    n_head: int = 6  #: attention heads (n_embd must divide by it)
    context_tokens: int = 256  #: n_positions; training windows are this long
    steps: int = 450  #: optimizer steps
    batch_size: int = 4  #: windows per step
    lr: float = 2e-3  #: peak learning rate (AdamW), after linear warm-up
    warmup_steps: int = 30  #: linear warm-up from lr / warmup_steps
    min_lr_ratio: float = 0.1  #: cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1  #: on matrices only (not biases, norms)
    grad_clip: float = 1.0  #: global gradient-norm clip
    seed: int = 0  #: initialisation and batch sampling
    holdout_every: int = 20  #: one stdlib file in this many is held out for evaluation
    eval_tokens: int = 65536  #: held-out tokens scored by :func:`evaluate`

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "context_tokens", "steps", "batch_size", "holdout_every", "eval_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"LMRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"LMRecipe.n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ConfigError(f"LMRecipe: need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0 (got {self.lr}, {self.min_lr_ratio}, {self.warmup_steps})")
        if self.holdout_every < 2:
            raise ConfigError("LMRecipe.holdout_every must be >= 2 (some files must remain for training)")

    def model_config(self) -> dict:
        """The Hugging Face ``GPT2Config`` of this recipe (byte-level vocabulary)."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_positions": self.context_tokens,
            "n_ctx": self.context_tokens,
            "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new",
            "tie_word_embeddings": False,
            "vocab_size": _VOCAB,
            "bos_token_id": _EOS,
            "eos_token_id": _EOS,
            "splitnet_tokenizer": "bytes",
        }

    def key(self) -> dict:
        """What the cache key hashes: the recipe, the trainer version and the data's Python version."""
        return {"recipe": dataclasses.asdict(self), "trainer": TRAINER_VERSION, "python": "%d.%d" % sys.version_info[:2]}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:10]

    def num_params(self) -> int:
        C, L, T = self.n_embd, self.n_layer, self.context_tokens
        return L * (12 * C * C + 13 * C) + 2 * _VOCAB * C + T * C + 2 * C

    def estimate_minutes(self) -> float:
        """Rough single-thread CPU training time (calibrated on an AMD EPYC VM core: ~50 GFLOP/s)."""
        T, C, L = self.context_tokens, self.n_embd, self.n_layer
        flops_per_token = 6 * (L * 12 * C * C + _VOCAB * C) + 12 * L * T * C
        return self.steps * self.batch_size * T * flops_per_token / 50e9 / 60


# --- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """Training and held-out token streams (int16: bytes 0..255 and the end-of-text id 256)."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_files: int
    heldout_files: int
    root: str

    @property
    def nbytes(self) -> int:
        return int(self.train.numel() + self.heldout.numel())


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Python files of the standard library in a deterministic (sorted relative path) order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue
        if p.is_file():
            out.append(rel)
    return [root / rel for rel in sorted(out, key=lambda r: r.as_posix())]


def _is_heldout(rel: str, holdout_every: int) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % holdout_every == 0


def heldout_files(root: str | Path | None = None, holdout_every: int = 20) -> list[Path]:
    """The stdlib files held out from training (for evaluation and benchmark prompts)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return [p for p in stdlib_files(root) if _is_heldout(p.relative_to(root).as_posix(), holdout_every)]


def stdlib_corpus(root: str | Path | None = None, holdout_every: int = 20, max_bytes: int | None = None) -> Corpus:
    """Read the standard library's source into train / held-out byte streams (files joined by EOS).

    ``max_bytes`` keeps only the first files (in sorted order) up to that many bytes (for tests).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    total = 0
    for path in stdlib_files(root):
        data = path.read_bytes()
        if max_bytes is not None and total + len(data) > max_bytes and parts[False]:
            break
        total += len(data)
        parts[_is_heldout(path.relative_to(root).as_posix(), holdout_every)].append(data)
    if not parts[False] or not parts[True]:
        raise ConfigError(f"{root} gave {len(parts[False])} training and {len(parts[True])} held-out files; need both (raise max_bytes?)")

    def stream(chunks: list[bytes]) -> torch.Tensor:
        sep = bytes([0])  # placeholder for EOS, replaced below
        joined = bytearray(sep.join(chunks) + sep)
        t = torch.frombuffer(joined, dtype=torch.uint8).to(torch.int16)
        ends = torch.tensor([len(c) for c in chunks]).add(1).cumsum(0) - 1  # index of each separator
        t[ends] = _EOS
        return t

    return Corpus(stream(parts[False]), stream(parts[True]), len(parts[False]), len(parts[True]), str(root))


def heldout_windows(corpus: Corpus, context_tokens: int, eval_tokens: int) -> torch.Tensor:
    """(N, context_tokens + 1) windows spread evenly over the held-out stream (deterministic)."""
    T = context_tokens
    n = max(1, min(eval_tokens // T, (corpus.heldout.numel() - 1) // T))
    span = corpus.heldout.numel() - (T + 1)
    if span < 0:
        raise ConfigError(f"held-out text ({corpus.heldout.numel()} tokens) is shorter than one window of {T + 1}")
    starts = torch.linspace(0, span, n).long()
    return corpus.heldout[starts[:, None] + torch.arange(T + 1)].long()  # (N, T + 1)


def unigram_loss(corpus: Corpus, windows: torch.Tensor) -> float:
    """Cross-entropy (nats/token) of the training set's add-one-smoothed byte frequencies on ``windows``."""
    counts = torch.bincount(corpus.train.long(), minlength=_VOCAB).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[windows[:, 1:]].mean())


# --- model ---------------------------------------------------------------------------------------
class TrainableGPT(nn.Module):
    """The project's GPT-2 blocks wired for training: (B, T) ids -> (B, T, vocab) logits."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        arch = GPT2Architecture(config)
        self.embed = arch.build_embed()
        self.blocks = nn.ModuleList(arch.build_block(i) for i in range(arch.num_blocks))
        self.head = arch.build_head()

    def init_weights(self, gen: torch.Generator) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 L), zero biases."""
        scale = 1.0 / math.sqrt(2 * len(self.blocks))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln_" in name or "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02 * (scale if name.endswith("c_proj.weight") else 1.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, ctx = self.embed({"input_ids": ids}, 0)  # (B, T) -> (B, T, C)
        for i, block in enumerate(self.blocks):
            h = block(h, ctx, None, i)
        return self.head(h, ctx, all_logits=True)["logits"]  # (B, T, C) -> (B, T, V)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """State under ``GPT2LMHeadModel``'s names (what :func:`load_model` reads)."""
        out = {f"transformer.{k}": v for k, v in self.embed.state_dict().items()}
        for i, block in enumerate(self.blocks):
            out.update({f"transformer.h.{i}.{k}": v for k, v in block.state_dict().items()})
        head = self.head.state_dict()
        out["transformer.ln_f.weight"] = head["norm.weight"]
        out["transformer.ln_f.bias"] = head["norm.bias"]
        out["lm_head.weight"] = head["lm_head.weight"]
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def logits_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, T) ids -> (B, T, V) logits for a :class:`TrainableGPT` or a loaded BlockModel."""
    if isinstance(model, nn.Module):
        return model
    stage = model.full()
    return lambda ids: stage({"input_ids": ids}, all_logits=True)["logits"]


@torch.no_grad()
def evaluate(model: Any, windows: torch.Tensor, batch_size: int = 16, device: str = "cpu") -> float:
    """Mean next-token cross-entropy (nats/token) over every position of ``windows``."""
    fn = logits_fn(model)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size].to(device)
        logits = fn(w[:, :-1]).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count


@torch.no_grad()
def draft_agreement(target: Any, draft: Any, windows: torch.Tensor, batch_size: int = 16) -> dict:
    """How often a draft predicts what the target would: on held-out ``windows``,

    ``greedy_agreement``: fraction of positions where both argmax tokens agree (the acceptance
    rate of greedy speculative decoding, per proposed token, if errors were independent);
    ``expected_acceptance``: mean sum_x min(p_target(x), p_draft(x)) (speculative *sampling*'s
    per-token acceptance at temperature 1).
    """
    ft, fd = logits_fn(target), logits_fn(draft)
    agree, accept, count = 0, 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size, :-1]
        lt, ld = ft(ids).float(), fd(ids).float()
        agree += int((lt.argmax(-1) == ld.argmax(-1)).sum())
        accept += float(torch.minimum(lt.softmax(-1), ld.softmax(-1)).sum(-1).sum())
        count += ids.numel()
    return {"greedy_agreement": agree / count, "expected_acceptance": accept / count, "positions": count}


# --- training ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """A trained model and how it got there (losses in nats per byte token)."""

    model: TrainableGPT
    recipe: LMRecipe
    metrics: dict


def _lr_at(recipe: LMRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    recipe: LMRecipe,
    *,
    corpus: Corpus | None = None,
    device: str = "cpu",
    progress: bool = True,
    name: str = "lm",
    threads: int = 1,
) -> TrainResult:
    """Train ``recipe`` from scratch; deterministic for a given recipe and device.

    CPU training uses ``threads`` intra-op threads (default 1): the same weights on any machine
    (the reduction order does not depend on the core count), and at these sizes a second thread
    gains little on an idle 2-core VM but loses up to 20x on a busy one (OpenMP threads spin
    waiting for a descheduled peer; measured).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _train(recipe, corpus, device, progress, name)
    finally:
        torch.set_num_threads(previous)


def _train(recipe: LMRecipe, corpus: Corpus | None, device: str, progress: bool, name: str) -> TrainResult:
    from tqdm.auto import tqdm

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} asked for but torch.cuda.is_available() is False; use device='cpu'")
    corpus = corpus or stdlib_corpus(holdout_every=recipe.holdout_every)
    T, B = recipe.context_tokens, recipe.batch_size
    if corpus.train.numel() < T + 2:
        raise ConfigError(f"training text ({corpus.train.numel()} tokens) is shorter than one window of {T + 1}")
    windows = heldout_windows(corpus, T, recipe.eval_tokens)

    gen = torch.Generator().manual_seed(recipe.seed)
    model = TrainableGPT(recipe.model_config())
    model.init_weights(gen)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.eval()
    initial = evaluate(model, windows, device=device)
    model.train()
    offsets = torch.arange(T + 1)
    t0 = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc=f"train {name}", disable=not progress, unit="step", file=sys.stderr)
    losses: list[float] = []
    for step in bar:
        starts = torch.randint(0, corpus.train.numel() - T - 1, (B,), generator=gen)
        batch = corpus.train[starts[:, None] + offsets].long().to(device)  # (B, T + 1)
        for group in opt.param_groups:
            group["lr"] = _lr_at(recipe, step)
        logits = model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    train_s = time.perf_counter() - t0
    model.eval()
    heldout = evaluate(model, windows, device=device)
    model.to("cpu")
    unigram = unigram_loss(corpus, windows)
    metrics = {
        "heldout_loss": round(heldout, 4),
        "heldout_ppl": round(math.exp(heldout), 3),
        "heldout_bits_per_byte": round(heldout / math.log(2), 4),
        "initial_heldout_loss": round(initial, 4),
        "unigram_loss": round(unigram, 4),
        "unigram_ppl": round(math.exp(unigram), 3),
        "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "train_s": round(train_s, 1),
        "train_tokens": recipe.steps * B * T,
        "eval_tokens": int(windows[:, 1:].numel()),
        "params": sum(p.numel() for p in model.parameters()),
        "train_files": corpus.train_files,
        "heldout_files": corpus.heldout_files,
        "corpus_mb": round(corpus.nbytes / 1e6, 2),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    return TrainResult(model, recipe, metrics)


# --- saving --------------------------------------------------------------------------------------
def byte_tokenizer_json() -> str:
    """A ``tokenizers`` tokenizer.json that gives the same ids as :class:`ByteTokenizer`
    (GPT-2's byte-to-unicode alphabet as a merge-free BPE; id 256 = ``<|endoftext|>``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = dict(zip(bs, (chr(c) for c in cs)))
    vocab = {byte_char[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = _EOS
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": _EOS, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []},
    })


def save_pretrained(result: TrainResult, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and splitnet_train.json to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {**result.recipe.model_config(), "splitnet_recipe_digest": result.recipe.digest()}
    save_file(result.model.checkpoint_tensors(), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(byte_tokenizer_json())
    (out / "splitnet_train.json").write_text(json.dumps({**result.recipe.key(), "digest": result.recipe.digest(), "metrics": result.metrics}, indent=2))
    return out


# --- built-ins -----------------------------------------------------------------------------------
def recipe_for(name: str, **overrides: Any) -> LMRecipe:
    """The recipe of trained built-in ``name`` (see ``builtin.TRAINED_LMS``), with overrides."""
    from splitnet.model.builtin import TRAINED_LMS

    if name not in TRAINED_LMS:
        raise ConfigError(f"unknown trained LM {name!r}; known: {', '.join(sorted(TRAINED_LMS))}")
    try:
        return LMRecipe(**{**TRAINED_LMS[name], **{k: v for k, v in overrides.items() if v is not None}})
    except TypeError as e:
        raise ConfigError(f"bad recipe for {name}: {e}") from e


def trained_dir(name: str, recipe: LMRecipe | None = None) -> Path:
    from splitnet.model.builtin import cache_dir

    recipe = recipe or recipe_for(name)
    return cache_dir() / "models" / f"{name}-{recipe.digest()}"


def materialize_trained(name: str, recipe: LMRecipe | None = None, *, device: str = "cpu", force: bool = False, progress: bool = True, threads: int = 1) -> tuple[Path, dict | None]:
    """The cached directory of trained built-in ``name``, training it first if absent (or ``force``).

    Returns the directory and the training metrics when this call trained (else None). A file lock
    makes concurrent callers wait for one training instead of each training its own.
    """
    import fcntl

    recipe = recipe or recipe_for(name)
    target = trained_dir(name, recipe)
    if (target / "model.safetensors").is_file() and not force:
        return target, None
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").is_file() and not force:
            return target, None  # trained by another process while we waited
        corpus = stdlib_corpus(holdout_every=recipe.holdout_every)
        est = "<1" if device.startswith("cuda") else f"~{max(1, round(recipe.estimate_minutes()))}"
        print(f"training {name} on {corpus.nbytes / 1e6:.1f} MB of stdlib source, {est} min, cached at {target}", file=sys.stderr, flush=True)
        result = train(recipe, corpus=corpus, device=device, progress=progress, name=name, threads=threads)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            save_pretrained(result, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, result.metrics
