"""Session.infer passes ``numpy=True`` only to tokenizers whose signature names it."""

from splitnet.edge.sdk import _has_parameter
from splitnet.model.tokenizer import ByteTokenizer


def test_has_parameter_reads_the_signature():
    assert _has_parameter(ByteTokenizer(), "numpy")  # splitnet's own tokenizers take it
    assert not _has_parameter(lambda texts, max_length=128: None, "numpy")  # a caller's own does not
    assert not _has_parameter(len, "numpy")  # a builtin: no signature to read, no flag passed

