"""ViT built from transformers' own modules, one stage at a time (as :mod:`splitnet.model.hf_decoder`).

A stage holds ViT layers a..b-1 and runs ``ViTModel.forward`` on a meta-device shell of the
stage's slice of the config: the patch/position embeddings on the first stage (later stages pass
the hidden state through), the final layernorm on the last. The head is the one of
``ViTForImageClassification`` (a linear classifier on the [CLS] token) when the checkpoint has one,
else the [CLS] token itself (``pooled``). Checkpoint names (the hub's ``encoder.layer.N...query``)
reach the modules through transformers' own conversion mapping (:mod:`splitnet.model.hf_names`).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from splitnet.errors import ModelLoadError, StageError
from splitnet.model.blocks import Stage
from splitnet.model.hf_decoder import HFArchitecture, HFEmbed, _materialize


def _vit_model_class():
    from transformers.models.vit.modeling_vit import ViTModel

    return ViTModel


class _Probe(nn.Module):
    """What ViTModel.forward reads of its embeddings on a stage without them: the weight dtype."""

    def __init__(self):
        super().__init__()
        self.projection = nn.Module()
        self.projection.register_buffer("weight", torch.zeros(0), persistent=False)


class _PassThrough(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embeddings = _Probe()  # follows the stage's dtype

    def forward(self, hidden, **kwargs):
        return hidden


class ViTHeadParts(nn.Module):
    def __init__(self, layernorm: nn.Module, classifier: nn.Linear | None):
        super().__init__()
        self.layernorm = layernorm
        self.classifier = classifier

    def forward(self, h: torch.Tensor, ctx: Any = None, all_logits: bool = False) -> dict:
        cls = h[:, 0]  # h is already layer-normed by the shell
        return {"logits": self.classifier(cls)} if self.classifier is not None else {"pooled": cls}


class HFViTStage(Stage):
    def __init__(self, arch: "HFViTArchitecture", start: int, end: int, embed, blocks, head):
        super().__init__(arch, start, end, embed, blocks, head)
        cfg = copy.deepcopy(arch.hf)
        cfg.num_hidden_layers = end - start
        with torch.device("meta"):
            shell = _vit_model_class()(cfg, add_pooling_layer=False)
        shell.layers = self.blocks
        if embed is not None:
            shell.embeddings = embed.embeddings
        else:
            self.passthrough = _PassThrough()  # a submodule: its dtype probe follows .to(dtype)
            shell.embeddings = self.passthrough
        shell.layernorm = head.layernorm if head is not None else nn.Identity()
        shell.eval()
        self.__dict__["_shell"] = shell

    @torch.no_grad()
    def forward(self, inputs: Mapping[str, torch.Tensor], cache=None, *, all_logits: bool = False) -> dict[str, torch.Tensor]:
        if self.embed is not None:
            x = inputs.get("pixel_values")
            if x is None:
                raise StageError(f"{self!r} expects 'pixel_values', got {sorted(inputs)}")
            size, ch = self.arch.hf.image_size, self.arch.hf.num_channels
            if x.dim() != 4 or x.shape[1] != ch or tuple(x.shape[2:]) != (size, size):
                raise StageError(f"pixel_values must be (batch, {ch}, {size}, {size}), got {tuple(x.shape)}")
        else:
            x = self.hidden_input(inputs)
        h = self._shell(pixel_values=x).last_hidden_state
        if self.head is not None:
            return self.head(h, None, all_logits=all_logits)
        return {"hidden": h}


class HFViTArchitecture(HFArchitecture):
    kind = "vision"
    families = {"vit": "vit"}  # the one family; registered for model_type vit only
    family_kind = "a vision family"

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        with torch.device("meta"):
            self._meta = _vit_model_class()(self.hf, add_pooling_layer=False)
        self.num_labels = len(config.get("id2label") or {}) if config.get("architectures", [""])[0].endswith("ForImageClassification") else 0

    def meta_task_model(self):
        """The model transformers would load this checkpoint into (for its name mapping)."""
        from transformers import ViTForImageClassification

        with torch.device("meta"):
            return ViTForImageClassification(self.hf) if self.num_labels else _vit_model_class()(self.hf, add_pooling_layer=False)

    def build_embed(self) -> nn.Module:
        return HFEmbed({"embeddings": _materialize(self._meta.embeddings, "embedding")})

    def build_block(self, index: int) -> nn.Module:
        return _materialize(self._meta.layers[index], f"block {index}")

    def build_head(self) -> nn.Module:
        classifier = nn.Linear(self.hf.hidden_size, self.num_labels) if self.num_labels else None
        return ViTHeadParts(_materialize(self._meta.layernorm, "final layernorm"), classifier)

    def _base(self, names):
        return "vit." if any(n.startswith("vit.") for n in names) else ""

    def _layers_prefix(self, names) -> str:
        return f"{self._base(names)}layers."  # checkpoint names arrive renamed to the modules' (hf_names)

    def embed_prefixes(self, names):
        return [f"{self._base(names)}"]

    def block_prefix(self, names, index):
        return f"{self._layers_prefix(names)}{index}."

    def head_prefixes(self, names):
        return [""]

    def head_tensors(self, tensors_by_name, names):
        base = self._base(names)
        out = {f"layernorm.{k}": f"{base}layernorm.{k}" for k in ("weight", "bias")}
        if self.num_labels:
            if "classifier.weight" not in names:
                raise ModelLoadError("the config says ViTForImageClassification but the checkpoint has no classifier.weight")
            out.update({"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
        return out

    def unexpected_tensors(self, names: list[str]) -> list[str]:
        base, layers = self._base(names), self._layers_prefix(names)
        expected = {f"{base}embeddings.{k}" for k in self._meta.embeddings.state_dict()}
        for i, layer in enumerate(self._meta.layers):
            expected |= {f"{layers}{i}.{k}" for k in layer.state_dict()}
        expected |= {f"{base}layernorm.weight", f"{base}layernorm.bias"}
        if self.num_labels:
            expected |= {"classifier.weight", "classifier.bias"}
        return [n for n in names if n not in expected and ".pooler." not in f".{n}"]

    def make_stage(self, start, end, embed, blocks, head) -> Stage:
        return HFViTStage(self, start, end, embed, blocks, head)
