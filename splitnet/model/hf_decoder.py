"""Decoder LMs built from transformers' own modules (as Petals does), one stage at a time.

A stage of blocks [a, b) holds the family's own decoder layers a..b-1 (built from the full config
with their global index, so every per-layer setting is the checkpoint's), plus the embedding on
the first stage and the final norm and LM head on the last. It runs them through the family's own
base-model ``forward`` (``LlamaModel.forward``, ``Gemma2Model.forward``, ...) on a *shell*: that
class built on the meta device from the stage's slice of the config (``num_hidden_layers = b - a``,
``layer_types[a:b]``), whose layers, embedding, norm and rotary embedding are replaced by the
stage's real ones. Masks (causal, sliding window, per layer type), positions and rotary come from
that code, and the stage's KV cache is the family's own ``DynamicCache`` over the stage's layers
only (layer ``a + j`` is cache layer ``j``). What lives outside the base model is here, per family,
in :data:`FAMILIES`: the LM head and its final logit soft-capping.

The rotary embedding's frequencies stay in float32 whatever dtype the stage runs in (transformers
keeps them so; casting them with the stage made bf16/fp16 rotary models diverge).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from splitnet.errors import ModelLoadError, StageError
from splitnet.model.blocks import Architecture, Stage
from splitnet.model.kv_cache import KVCache
from splitnet.model.slot_cache import SlotCache, SlotPool


@dataclass(frozen=True)
class Family:
    """What splitnet needs to know about a decoder family beyond transformers' base model."""

    base_class: str  # e.g. "LlamaModel"
    module: str  # transformers.models.<module>.modeling_<module>
    logit_softcap_key: str = ""  # config field of a tanh soft-cap on the final logits
    embed_scale_sqrt_hidden: bool = False  # the embedding multiplies by sqrt(hidden_size) (its buffer ``embed_scale``)
    prefix: str = "model."  # where the base model sits in the causal-LM checkpoint
    embed_attrs: tuple[str, ...] = ("embed_tokens",)  # the base model's input modules (first stage only)
    positions_attr: str = ""  # a learned position embedding the base forward adds to inputs_embeds
    layers_attr: str = "layers"
    norm_attr: str = "norm"
    rotary_attr: str = "rotary_emb"  # "" when positions are not rotary
    masks_by_layer_type: bool = False  # the base forward takes {layer type: mask} (``config.layer_types``)
    sliding_window_key: str = ""  # config field of a window every layer uses (when the forward takes one mask)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaModel", "llama"),
    "mistral": Family("MistralModel", "mistral", sliding_window_key="sliding_window"),
    "qwen2": Family("Qwen2Model", "qwen2", masks_by_layer_type=True),
    "qwen3": Family("Qwen3Model", "qwen3", masks_by_layer_type=True),
    "phi3": Family("Phi3Model", "phi3", sliding_window_key="sliding_window"),
    "gemma2": Family("Gemma2Model", "gemma2", logit_softcap_key="final_logit_softcapping", embed_scale_sqrt_hidden=True,
                     masks_by_layer_type=True),
    "gemma3_text": Family("Gemma3TextModel", "gemma3", logit_softcap_key="final_logit_softcapping", embed_scale_sqrt_hidden=True,
                          masks_by_layer_type=True),
    "gpt2": Family("GPT2Model", "gpt2", prefix="transformer.", embed_attrs=("wte", "wpe"), positions_attr="wpe",
                   layers_attr="h", norm_attr="ln_f", rotary_attr=""),
}


def hf_config(config: Mapping[str, Any], attn_implementation: str | None = None):
    """transformers' config object for a config.json dict (no hub: built from the dict). The
    attention implementation is transformers' own default for the family unless given."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type" and not k.startswith("_splitnet")})
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cfg


def _base_class(family: Family):
    import importlib

    mod = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    return getattr(mod, family.base_class)


def _causal_lm_class(cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(cfg)]


def _stage_config(cfg, start: int, end: int):
    """The config of a model made of layers [start, end) only (per-layer lists sliced)."""
    sub = copy.deepcopy(cfg)
    sub.num_hidden_layers = end - start
    if getattr(sub, "layer_types", None) is not None:
        sub.layer_types = list(cfg.layer_types[start:end])
    return sub


def _materialize(meta_module: nn.Module, what: str, filled: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A CPU copy of a module built on the meta device, storage uninitialised (the checkpoint fills
    it). Buffers that are not in the checkpoint must be given in ``filled`` (name -> value), else
    the module is refused: it would keep garbage there."""
    filled = dict(filled or {})
    for name, sub in meta_module.named_modules():
        for buf in getattr(sub, "_non_persistent_buffers_set", ()):
            full = f"{name}.{buf}" if name else buf
            if full not in filled:
                raise ModelLoadError(f"{what}: {type(sub).__name__} {name!r} has a buffer {buf!r} that is not in the checkpoint; splitnet cannot build it yet")
    module = copy.deepcopy(meta_module).to_empty(device="cpu")
    for full, value in filled.items():
        owner, _, buf = full.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        target.register_buffer(buf, value.to(getattr(target, buf).dtype), persistent=False)
    return module


class HFArchitecture(Architecture):
    """A family built from transformers' modules: sizes come from its transformers config
    ``self.hf`` (whose attribute map also answers for DistilBERT's ``n_layers`` and ``dim``)."""

    hf: Any
    #: model_type -> family, and what they are called in the refusal of another model_type
    families: Mapping[str, Any] = {}
    family_kind: str = ""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        model_type = config.get("model_type")
        if model_type not in self.families:
            raise ModelLoadError(f"model_type {model_type!r} is not {self.family_kind} splitnet builds from transformers ({', '.join(sorted(self.families))})")
        self.family = self.families[model_type]
        self.hf = hf_config(config)

    @property
    def num_blocks(self) -> int:
        return int(self.hf.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.hf.hidden_size)


class HFEmbed(nn.Module):
    """The family's input modules under their checkpoint names (``embed_tokens``; GPT-2's ``wte``
    and ``wpe``; encoders' and ViT's ``embeddings``)."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


class _NoPositions(nn.Module):
    """Stands in for a learned position embedding on stages after the first: the positions were
    added once, by the first stage."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.register_buffer("dtype_probe", torch.zeros(0), persistent=False)  # follows the stage's dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*position_ids.shape, self.width), device=position_ids.device, dtype=self.dtype_probe.dtype)


class HFHead(nn.Module):
    """Final norm and LM head (state keys ``norm.*`` and ``lm_head.*``)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear, softcap: float | None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.softcap = softcap

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class _FP32Rotary:
    """The rotary embedding, outside the stage's module tree so ``stage.to(dtype)`` leaves its
    float32 frequencies alone; moved to the hidden state's device when first used there."""

    def __init__(self, rotary: nn.Module):
        self.module = rotary

    def on(self, device: torch.device) -> nn.Module:
        if next(iter(self.module.buffers()), torch.empty(0)).device != device:
            self.module.to(device)
        return self.module


class HFKVCache(KVCache):
    """splitnet's per-request cache interface over transformers' ``DynamicCache`` of one stage."""

    def __init__(self, stage_config, start: int = 0):
        super().__init__()
        from transformers import DynamicCache

        self.hf = DynamicCache(config=stage_config)
        self.start = start  # block ``start + j`` is cache layer ``j``

    def layer_ids(self) -> list[int]:
        return [self.start + j for j, layer in enumerate(self.hf.layers) if getattr(layer, "is_initialized", False)]

    def get_layer(self, layer: int):
        entry = self.hf.layers[layer - self.start]
        return entry.keys, entry.values

    def set_layer(self, layer: int, k, v) -> None:
        entry = self.hf.layers[layer - self.start]
        if getattr(entry, "is_initialized", False):
            raise ValueError(f"cache layer of block {layer} is already filled")
        self.hf.update(k, v, layer - self.start)

    def append(self, layer, k, v):  # the layers write through ``self.hf`` themselves
        raise TypeError("HFKVCache is filled by transformers' layers through .hf")

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if length < self.length:
            self.hf.crop(-(self.length - length))  # transformers 5: a negative count of tokens to remove
            self.length = length

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.hf, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.nbytes
        return total


class HFDecoderStage(Stage):
    """Blocks [start, end) of a decoder LM run by the family's own base-model forward."""

    def __init__(self, arch: "HFDecoderArchitecture", start: int, end: int, embed, blocks, head):
        super().__init__(arch, start, end, embed, blocks, head)
        fam = arch.family
        self.stage_config = _stage_config(arch.hf, start, end)
        with torch.device("meta"):
            shell = _base_class(fam)(self.stage_config)
        setattr(shell, fam.layers_attr, self.blocks)  # the real layers (registered under the stage as blocks.*)
        for name in fam.embed_attrs:
            setattr(shell, name, getattr(embed, name) if embed is not None else None)
        if embed is None and fam.positions_attr:
            self.no_positions = _NoPositions(arch.hidden_size)  # a submodule: it follows .to(dtype)
            setattr(shell, fam.positions_attr, self.no_positions)
        setattr(shell, fam.norm_attr, head.norm if head is not None else nn.Identity())
        keep = {fam.layers_attr, fam.norm_attr, fam.rotary_attr, *fam.embed_attrs}
        for name, child in list(shell.named_children()):
            if name not in keep and any(True for _ in child.parameters()):
                setattr(shell, name, None)  # a meta module with weights must never run
        shell.eval()  # its own modules (GPT-2's embedding dropout) never train: a stage only serves
        self.__dict__["_shell"] = shell  # not a submodule: its parts are registered above
        self.__dict__["_rotary"] = _FP32Rotary(arch.rotary()) if fam.rotary_attr else None
        if fam.rotary_attr:
            setattr(shell, fam.rotary_attr, None)

    def new_cache(self) -> HFKVCache:
        return HFKVCache(self.stage_config, self.start)

    def cache_pool(self, max_requests: int, max_bytes: int | None = None) -> SlotPool:
        """The KV cache of many requests that :meth:`forward_batch` batches over (one slot each)."""
        return SlotPool(max_slots=max_requests, max_positions=getattr(self.arch.hf, "max_position_embeddings", None), max_bytes=max_bytes)

    def slot_masks(self, positions: torch.Tensor, read_len: int, dtype: torch.dtype):
        """Per-member causal (and sliding-window) masks over the members' slot rows, for queries
        at ``positions`` (B, T) and keys 0..read_len-1 of each member's row, in the form the
        family's forward takes: (B, 1, T, read_len), bool for SDPA, additive for eager; a dict by
        layer type where the family has layer types."""
        device = positions.device
        pos = positions.unsqueeze(-1)  # (B, T, 1) absolute position of each query
        kv = torch.arange(read_len, device=device).view(1, 1, -1)  # (1, 1, read_len)
        causal = kv <= pos
        cfg, fam = self.stage_config, self.arch.family

        def finish(allowed: torch.Tensor) -> torch.Tensor:
            allowed = allowed.unsqueeze(1)  # (B, 1, T, read_len)
            if cfg._attn_implementation == "sdpa":
                return allowed
            if cfg._attn_implementation != "eager":
                raise StageError(f"batched decoding supports sdpa and eager attention, not {cfg._attn_implementation!r}")
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

        def windowed(window: int | None) -> torch.Tensor:
            return causal & (kv > pos - window) if window else causal

        if fam.masks_by_layer_type:
            types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
            return {t: finish(windowed(cfg.sliding_window if t == "sliding_attention" else None)) for t in types}
        window = getattr(cfg, fam.sliding_window_key, None) if fam.sliding_window_key else None
        return finish(windowed(window))

    def enable_cuda_graphs(self, pool: SlotPool, max_batch: int) -> None:
        """Replay captured CUDA graphs for decode steps (one new token per member) over ``pool``."""
        from splitnet.model.cuda_graphs import DecodeGraphs

        self.__dict__["_graphs"] = DecodeGraphs(self, pool, max_batch)

    @torch.no_grad()
    def forward_batch(self, inputs: list[Mapping[str, torch.Tensor]], caches: list[SlotCache] | None, *, all_logits: bool = False,
                      head: bool = True) -> list[dict[str, torch.Tensor]]:
        """One forward for several requests, each (1, T_i) new tokens (or hidden states) after its
        own cached positions in ``caches`` (slots of one :meth:`cache_pool`); outputs per member,
        in order. Members of different lengths are right-padded to the longest: a padded
        position sits after every real one of its member, so the causal mask already keeps every
        real query off it, its keys land in the member's row past its length (never read: the
        cache advances by ``T_i`` only) and its outputs are dropped. Without caches: members of
        equal shape stacked along the batch. ``head=False`` on the last stage fills the caches
        only (a prefill chunk whose logits nobody reads: the LM head is often the stage's
        largest matrix) and returns empty outputs."""
        if caches is None:
            return super().forward_batch(inputs, None, all_logits=all_logits)
        if len(caches) != len(inputs) or not inputs:
            raise StageError("forward_batch needs one cache per member")
        pool = caches[0].pool
        if any(c.pool is not pool for c in caches):
            raise StageError("the caches of one batch must come from one pool")
        if any("attention_mask" in x for x in inputs):
            raise StageError("a cached request sends one sequence (batch 1, no attention_mask)")
        # (B, T) ids or (B, T, C) hidden: one vocabulary check and one copy to the device for the whole batch
        x = self.stacked_input(inputs, self.arch.hf.vocab_size if self.embed is not None else None, ragged=True)
        T = x.shape[1]
        lengths = [int(next(iter(m.values())).shape[1]) for m in inputs]  # each member's real new tokens
        limit = getattr(self.arch.hf, "max_position_embeddings", None)
        longest = max(c.length + n for c, n in zip(caches, lengths))
        if limit and longest > limit:
            raise StageError(f"sequence of {longest} tokens exceeds max_position_embeddings={limit} of this model")
        if limit and max(c.length for c in caches) + T > limit:  # the padding would pass the position table: one by one
            return [self.forward_batch([m], [c], all_logits=all_logits, head=head)[0] for m, c in zip(inputs, caches)]
        device = x.device
        graphs = self.__dict__.get("_graphs")
        if graphs is not None and x.is_cuda and graphs.pool is pool and graphs.supports(caches, T, all_logits):
            y = graphs.run(x, caches)  # (B, vocab) logits or (B, 1, C) hidden
            key = "logits" if self.head is not None else "hidden"
            return [{key: y[b : b + 1]} for b in range(len(inputs))]
        view = pool.view(caches, T)
        param = next(self.parameters())
        kwargs: dict[str, Any] = {"input_ids": x} if self.embed is not None else {"inputs_embeds": x}
        positions = view.positions(device)
        out = self._run_shell(device, attention_mask=self.slot_masks(positions, view.read_len, param.dtype),
                              position_ids=positions, cache=view, use_cache=True, **kwargs)
        for c, n in zip(caches, lengths):
            c.advance(n)
        h = out.last_hidden_state  # (B, T, C)
        ragged = any(n != T for n in lengths)
        if self.head is not None:
            if not head:
                return [{} for _ in inputs]
            if all_logits:
                logits = self.head.logits(h)
                return [{"logits": logits[b : b + 1, :n]} for b, n in enumerate(lengths)]
            last = h[torch.arange(len(lengths), device=h.device), torch.tensor(lengths, device=h.device) - 1].unsqueeze(1) if ragged else h[:, -1:]
            logits = self.head.logits(last)[:, -1]
            return [{"logits": logits[b : b + 1]} for b in range(len(inputs))]
        return [{"hidden": h[b : b + 1, :n]} for b, n in enumerate(lengths)]

    def _run_shell(self, device: torch.device, **kwargs):
        """The family's base-model forward on the shell, the stage's layers and rotary bound."""
        shell = self._shell
        self._bind_layers()
        rotary_attr = self.arch.family.rotary_attr
        if rotary_attr:
            setattr(shell, rotary_attr, self._rotary.on(device))
        try:
            return shell(**kwargs)
        finally:
            if rotary_attr:
                setattr(shell, rotary_attr, None)

    def _bind_layers(self) -> None:
        """Cache layer of block ``start + j`` is ``j`` (the stage's cache holds its layers only).
        Set on every call: stages cut from one loaded model share their block modules."""
        for j, block in enumerate(self.blocks):
            for m in block.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = j

    @torch.no_grad()
    def forward(self, inputs: Mapping[str, torch.Tensor], cache: KVCache | None = None, *, all_logits: bool = False) -> dict[str, torch.Tensor]:
        if isinstance(cache, SlotCache):
            return self.forward_batch([inputs], [cache], all_logits=all_logits)[0]
        if cache is not None and not isinstance(cache, HFKVCache):
            raise StageError(f"{self!r} needs the cache from its new_cache(), got {type(cache).__name__}")
        past = cache.length if cache is not None else 0
        kwargs: dict[str, Any] = {}
        if self.embed is not None:
            ids = self.token_ids_input(inputs, self.arch.hf.vocab_size)
            kwargs["input_ids"] = ids
            B, T = ids.shape
            device = ids.device
        else:
            h = kwargs["inputs_embeds"] = self.hidden_input(inputs)
            B, T = h.shape[:2]
            device = h.device
        limit = getattr(self.arch.hf, "max_position_embeddings", None)
        if limit and past + T > limit:
            raise StageError(f"sequence of {past + T} tokens exceeds max_position_embeddings={limit} of this model")
        mask = inputs.get("attention_mask")
        if mask is not None:
            mask = mask.to(device=device, dtype=torch.long)
            if bool(mask.all()) and mask.shape in ((B, past + T), (B, T)):
                mask = None  # no padding: the plain causal path (and a new-tokens-only mask means the same)
        if mask is not None:
            if mask.shape != (B, past + T):
                raise StageError(f"attention_mask must be (batch, past + new tokens) = ({B}, {past + T}), got {tuple(mask.shape)}")
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]  # per-sequence positions (left padding)
        else:
            positions = torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
        out = self._run_shell(device, attention_mask=mask, position_ids=positions, cache=cache.hf if cache is not None else None,
                              use_cache=cache is not None, **kwargs)
        h = out.last_hidden_state
        if cache is not None:
            cache.advance(T)
        if self.head is not None:
            logits = self.head.logits(h if all_logits else h[:, -1:])
            return {"logits": logits if all_logits else logits[:, -1]}
        result = {"hidden": h}
        if mask is not None:
            result["attention_mask"] = mask
        return result


class HFDecoderArchitecture(HFArchitecture):
    """A decoder family of :data:`FAMILIES`, built from transformers' modules."""

    kind = "decoder"
    families = FAMILIES
    family_kind = "a decoder family"

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        with torch.device("meta"):
            self._meta = _base_class(self.family)(self.hf)

    def meta_task_model(self):
        """The model transformers would load this checkpoint into (for its name mapping)."""
        with torch.device("meta"):
            return _causal_lm_class(self.hf)(self.hf)

    def rotary(self) -> nn.Module:
        return type(getattr(self._meta, self.family.rotary_attr))(config=self.hf)  # real float32 frequencies, from the config

    def _part(self, name: str) -> nn.Module:
        return getattr(self._meta, name)

    def build_embed(self) -> nn.Module:
        filled = {"embed_scale": torch.tensor(self.hf.hidden_size**0.5)} if self.family.embed_scale_sqrt_hidden else None
        return HFEmbed({n: _materialize(self._part(n), "embedding", filled if i == 0 else None) for i, n in enumerate(self.family.embed_attrs)})

    def build_block(self, index: int) -> nn.Module:
        return _materialize(self._part(self.family.layers_attr)[index], f"block {index}")

    def build_head(self) -> nn.Module:
        softcap = getattr(self.hf, self.family.logit_softcap_key, None) if self.family.logit_softcap_key else None
        lm_head = nn.Linear(self.hf.hidden_size, self.hf.vocab_size, bias=False)
        return HFHead(_materialize(self._part(self.family.norm_attr), "final norm"), lm_head, softcap)

    def _base(self, names):
        p = self.family.prefix
        return p if any(n.startswith(p) for n in names) else ""

    def embed_prefixes(self, names):
        return [self._base(names)]

    def block_prefix(self, names, index):
        return f"{self._base(names)}{self.family.layers_attr}.{index}."

    def head_prefixes(self, names):
        return [""]

    def head_tensors(self, tensors_by_name, names):
        base, norm = self._base(names), self.family.norm_attr
        out = {f"norm.{k}": f"{base}{norm}.{k}" for k in self._part(norm).state_dict()}
        if "lm_head.weight" in names:
            out["lm_head.weight"] = "lm_head.weight"
        elif getattr(self.hf, "tie_word_embeddings", False):
            out["lm_head.weight"] = f"{base}{self.family.embed_attrs[0]}.weight"
        else:
            raise ModelLoadError("the checkpoint has no lm_head.weight and its config says the head is not tied to the embedding (tie_word_embeddings: false)")
        return out

    def unexpected_tensors(self, names: list[str]) -> list[str]:
        """Checkpoint tensors the whole model would not load (a stage checks the whole file: a
        tensor nobody loads means a config field or module splitnet does not honour). Allowed to
        go unused: what the family's transformers class itself ignores on load
        (``_keys_to_ignore_on_load_unexpected``, e.g. saved rotary ``inv_freq`` buffers)."""
        import re

        base, fam = self._base(names), self.family
        expected = {f"{base}{n}.{k}" for n in fam.embed_attrs for k in self._part(n).state_dict()}
        for i, layer in enumerate(self._part(fam.layers_attr)):
            expected |= {f"{base}{fam.layers_attr}.{i}.{k}" for k in layer.state_dict()}
        expected |= {f"{base}{fam.norm_attr}.{k}" for k in self._part(fam.norm_attr).state_dict()} | {"lm_head.weight"}
        ignore = [re.compile(p) for p in (getattr(_causal_lm_class(self.hf), "_keys_to_ignore_on_load_unexpected", None) or [])]
        ignore.append(re.compile(r"rotary_emb\.inv_freq$"))
        return [n for n in names if n not in expected and not any(p.search(n) for p in ignore)]

    def make_stage(self, start, end, embed, blocks, head) -> Stage:
        return HFDecoderStage(self, start, end, embed, blocks, head)

    def carry(self, ctx):
        return {}
