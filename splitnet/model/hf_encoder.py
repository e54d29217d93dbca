"""Text encoders (BERT, RoBERTa, XLM-RoBERTa, DistilBERT) built from transformers' own modules.

The same construction as :mod:`splitnet.model.hf_decoder`: a stage holds the family's own layers
(built from the full config with their global index) and runs the family's base-model ``forward``
on a meta-device shell built from the stage's slice of the config; the embeddings module runs on the
first stage only (later stages pass the hidden state through in its place). The padding mask
crosses every cut beside the hidden state. The last stage's head is splitnet's:
sentence-transformers pooling (:class:`~splitnet.model.pooling.MeanPoolHead`) read from the
directory's modules.json and 1_Pooling/config.json, mean pooling when there are none.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from splitnet.errors import StageError
from splitnet.model.blocks import Stage
from splitnet.model.pooling import MeanPoolHead
from splitnet.model.hf_decoder import HFArchitecture, HFEmbed, _base_class, _materialize


@dataclass(frozen=True)
class EncoderFamily:
    base_class: str
    module: str
    prefix: str  # where the base model sits in a task model's checkpoint ("bert.", "roberta.")
    layers_path: str = "encoder.layer"
    uses_token_types: bool = True
    #: task heads in the checkpoint that would be dropped (refused: the embedding is not what they compute)
    task_heads: tuple[str, ...] = ("classifier.", "cls.", "qa_outputs.", "lm_head.", "pre_classifier.", "vocab_")


ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "bert": EncoderFamily("BertModel", "bert", "bert."),
    "roberta": EncoderFamily("RobertaModel", "roberta", "roberta."),
    "xlm-roberta": EncoderFamily("XLMRobertaModel", "xlm_roberta", "roberta."),
    "distilbert": EncoderFamily("DistilBertModel", "distilbert", "distilbert.", layers_path="transformer.layer", uses_token_types=False),
}


def _meta_base(family: EncoderFamily, cfg, pooler: bool = False) -> nn.Module:
    """The family's base model on the meta device (DistilBERT has no pooler to leave out)."""
    cls = _base_class(family)
    with torch.device("meta"):
        return cls(cfg) if family.module == "distilbert" else cls(cfg, add_pooling_layer=pooler)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: Any) -> None:
    owner, _, name = path.rpartition(".")
    setattr(_get(module, owner) if owner else module, name, value)


class _PassThrough(nn.Module):
    """Stands in for the embeddings on stages after the first: the hidden state goes on as it is."""

    def forward(self, *args, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = next(a for a in reversed(args) if isinstance(a, torch.Tensor))
        return inputs_embeds


class SequenceClassificationHead(nn.Module):
    """The head of ``<Family>ForSequenceClassification``, on the last hidden state, from the task
    model's own modules (the few lines that differ per family are here): BERT pools the [CLS]
    token (dense + tanh) before its classifier; RoBERTa / XLM-R's classifier takes the sequence;
    DistilBERT applies pre_classifier + ReLU to the [CLS] token."""

    def __init__(self, family: str, modules: Mapping[str, nn.Module]):
        super().__init__()
        self.family = family
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, h: torch.Tensor, ctx: Any = None, all_logits: bool = False) -> dict:
        if self.family == "bert":
            logits = self.classifier(self.pooler(h))
        elif self.family in ("roberta", "xlm_roberta"):
            logits = self.classifier(h)
        else:  # distilbert
            logits = self.classifier(torch.relu(self.pre_classifier(h[:, 0])))
        return {"logits": logits}


#: checkpoint name (under the task model) of each head module, per family
_HEAD_MODULES = {
    "bert": {"pooler": "bert.pooler", "classifier": "classifier"},
    "roberta": {"classifier": "classifier"},
    "xlm_roberta": {"classifier": "classifier"},
    "distilbert": {"pre_classifier": "pre_classifier", "classifier": "classifier"},
}


class HFEncoderStage(Stage):
    """Blocks [start, end) of a text encoder run by the family's own base-model forward."""

    def __init__(self, arch: "HFEncoderArchitecture", start: int, end: int, embed, blocks, head):
        super().__init__(arch, start, end, embed, blocks, head)
        fam = arch.family
        cfg = copy.deepcopy(arch.hf)
        cfg.num_hidden_layers = end - start
        if fam.module == "distilbert":
            cfg.n_layers = end - start
        shell = _meta_base(fam, cfg)
        _set(shell, fam.layers_path, self.blocks)
        shell.embeddings = embed.embeddings if embed is not None else _PassThrough()
        shell.eval()
        self.__dict__["_shell"] = shell

    @torch.no_grad()
    def forward(self, inputs: Mapping[str, torch.Tensor], cache=None, *, all_logits: bool = False) -> dict[str, torch.Tensor]:
        fam = self.arch.family
        kwargs: dict[str, Any] = {}
        if self.embed is not None:
            ids = self.token_ids_input(inputs, self.arch.hf.vocab_size)
            # RoBERTa-style positions start after the padding index: two fewer usable positions
            limit = self.arch.hf.max_position_embeddings - (2 if fam.module in ("roberta", "xlm_roberta") else 0)
            if ids.shape[1] > limit:
                raise StageError(f"sequence of {ids.shape[1]} tokens exceeds the {limit} positions of this model")
            kwargs["input_ids"] = ids
            if fam.uses_token_types and inputs.get("token_type_ids") is not None:
                kwargs["token_type_ids"] = inputs["token_type_ids"]
            B, T = ids.shape
        else:
            h = kwargs["inputs_embeds"] = self.hidden_input(inputs)
            B, T = h.shape[:2]
        mask = inputs.get("attention_mask")
        mask = torch.ones(B, T, dtype=torch.long) if mask is None else mask.to(torch.long)
        if mask.shape != (B, T):
            raise StageError(f"attention_mask must be (batch, tokens) = ({B}, {T}), got {tuple(mask.shape)}")
        h = self._shell(attention_mask=mask, **kwargs).last_hidden_state
        if self.head is not None:
            return self.head(h, {"attention_mask": mask}, all_logits=all_logits)
        return {"hidden": h, "attention_mask": mask}


class HFEncoderArchitecture(HFArchitecture):
    """A text-encoder family of :data:`ENCODER_FAMILIES`, built from transformers' modules."""

    kind = "encoder"
    families = ENCODER_FAMILIES
    family_kind = "an encoder family"

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        archs = config.get("architectures") or [""]
        sentence = bool(config.get("_splitnet_pooling", {}).get("from_files"))
        self.classifies = archs[0].endswith("ForSequenceClassification") and not sentence
        self._meta = _meta_base(self.family, self.hf)

    @functools.cached_property
    def _meta_classifier(self) -> nn.Module:
        """The ForSequenceClassification model on the meta device (its head modules and names), built once."""
        from transformers import AutoModelForSequenceClassification

        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(self.hf)

    def meta_task_model(self):
        """The model transformers would load this checkpoint into (for its name mapping)."""
        return self._meta_classifier if self.classifies else _meta_base(self.family, self.hf, pooler=True)

    def _layers(self):
        return _get(self._meta, self.family.layers_path)

    def build_embed(self) -> nn.Module:
        emb = self._meta.embeddings
        filled = {}
        for name, sub in emb.named_modules():
            for buf in getattr(sub, "_non_persistent_buffers_set", ()):
                full = f"{name}.{buf}" if name else buf
                if buf == "position_ids":
                    filled[full] = torch.arange(self.hf.max_position_embeddings).expand((1, -1))
                elif buf == "token_type_ids":
                    filled[full] = torch.zeros((1, self.hf.max_position_embeddings), dtype=torch.long)
        return HFEmbed({"embeddings": _materialize(emb, "embedding", filled)})

    def build_block(self, index: int) -> nn.Module:
        return _materialize(self._layers()[index], f"block {index}")

    def build_head(self) -> nn.Module:
        if self.classifies:
            task = self._meta_classifier
            mods = {k: _materialize(_get(task, path), f"classification head {k}") for k, path in _HEAD_MODULES[self.family.module].items()}
            return SequenceClassificationHead(self.family.module, mods)
        pooling = self.config.get("_splitnet_pooling", {"mode": "mean", "normalize": False})
        return MeanPoolHead(pooling.get("mode", "mean"), pooling.get("normalize", False))

    def _base(self, names):
        p = self.family.prefix
        return p if any(n.startswith(p) for n in names) else ""

    def embed_prefixes(self, names):
        return [self._base(names)]

    def block_prefix(self, names, index):
        return f"{self._base(names)}{self.family.layers_path}.{index}."

    def head_prefixes(self, names):
        return []

    def head_tensors(self, tensors_by_name, names):
        if not self.classifies:
            return {}
        out = {}
        for k, path in _HEAD_MODULES[self.family.module].items():
            for key in _get(self._meta_classifier, path).state_dict():
                out[f"{k}.{key}"] = f"{path}.{key}"
        return out

    def unexpected_tensors(self, names: list[str]) -> list[str]:
        """Tensors no module of the whole encoder loads: a task head (its output is not the
        embedding), or a module splitnet does not build. The pooler of BertModel checkpoints may
        go unused (sentence embeddings do not use it), as transformers' own loaders allow."""
        import re

        base = self._base(names)
        expected = {f"{base}embeddings.{k}" for k in self._meta.embeddings.state_dict()}
        for i, layer in enumerate(self._layers()):
            expected |= {f"{base}{self.family.layers_path}.{i}.{k}" for k in layer.state_dict()}
        allowed = re.compile(r"(^|\.)pooler\.|embeddings\.position_ids$")
        if self.classifies:
            for path in _HEAD_MODULES[self.family.module].values():
                expected |= {f"{path}.{k}" for k in _get(self._meta_classifier, path).state_dict()}
        heads = [n for n in names if n.startswith(self.family.task_heads) and n not in expected]
        if heads:
            return heads
        return [n for n in names if n not in expected and not allowed.search(n)]

    def make_stage(self, start, end, embed, blocks, head) -> Stage:
        return HFEncoderStage(self, start, end, embed, blocks, head)

    def carry(self, ctx):
        return {"attention_mask": ctx["attention_mask"]}
