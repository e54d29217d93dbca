"""Feature codecs for the tensors that cross each cut (see :mod:`splitnet.codecs.base`).

Codecs by name (``make_codec(name, **config)``): ``fp32``, ``fp16``, ``int8``, ``int4``, ``topk``
(numpy only), ``pq``, ``rvq`` (faiss codebooks), ``alignedvq`` and ``transform`` (DCT + KLT +
range coding of CNN feature maps, fitted in the tail's Fisher metric from
:mod:`splitnet.codecs.sensitivity`). Fitted codecs save and load as safetensors + a JSON manifest
with :func:`save_codec` / :func:`load_codec`.
"""

from splitnet.codecs.base import Codec, Payload
from splitnet.codecs.registry import codec_class, known_codecs, make_codec, register_codec, register_lazy
from splitnet.codecs.store import content_hash, load_codec, save_codec
from splitnet.codecs.tokens import gather_tokens, scatter_tokens

__all__ = [
    "Codec", "Payload", "codec_class", "known_codecs", "make_codec", "register_codec", "register_lazy",
    "save_codec", "load_codec", "content_hash", "gather_tokens", "scatter_tokens",
]
