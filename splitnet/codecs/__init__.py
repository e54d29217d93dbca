"""Feature codecs for the tensors that cross each cut (see :mod:`splitnet.codecs.base`)."""

from splitnet.codecs.base import Codec, Payload
from splitnet.codecs.registry import codec_class, known_codecs, make_codec, register_codec, register_lazy

__all__ = ["Codec", "Payload", "codec_class", "known_codecs", "make_codec", "register_codec", "register_lazy"]
