"""The allow-list of tensor dtypes that may cross the wire, by their wire names.

bfloat16 has no numpy dtype; it travels as its raw 16-bit pattern and is viewed as
``torch.bfloat16`` by the receiver (see :func:`splitnet.wire.message.Message.torch`).
"""

from __future__ import annotations

import numpy as np

# wire name -> (numpy storage dtype, itemsize in bytes)
WIRE_DTYPES: dict[str, np.dtype] = {
    "f64": np.dtype("<f8"),
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),  # raw bit pattern
    "i64": np.dtype("<i8"),
    "i32": np.dtype("<i4"),
    "i16": np.dtype("<i2"),
    "i8": np.dtype("i1"),
    "u8": np.dtype("u1"),
    "u16": np.dtype("<u2"),
    "u32": np.dtype("<u4"),
    "bool": np.dtype("?"),
}

_NUMPY_TO_WIRE = {
    np.dtype("<f8"): "f64",
    np.dtype("<f4"): "f32",
    np.dtype("<f2"): "f16",
    np.dtype("<i8"): "i64",
    np.dtype("<i4"): "i32",
    np.dtype("<i2"): "i16",
    np.dtype("i1"): "i8",
    np.dtype("u1"): "u8",
    np.dtype("<u2"): "u16",
    np.dtype("<u4"): "u32",
    np.dtype("?"): "bool",
}

_TORCH_TO_WIRE = {
    "torch.float64": "f64",
    "torch.float32": "f32",
    "torch.float16": "f16",
    "torch.bfloat16": "bf16",
    "torch.int64": "i64",
    "torch.int32": "i32",
    "torch.int16": "i16",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.uint16": "u16",
    "torch.uint32": "u32",
    "torch.bool": "bool",
}


def wire_name_of_numpy(dtype: np.dtype) -> str:
    """Wire name of a numpy dtype; raises TypeError for anything off the allow-list."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == "=" else np.dtype(dtype)
    name = _NUMPY_TO_WIRE.get(dt)
    if name is None:
        raise TypeError(f"dtype {dtype!r} cannot be sent on the wire; allowed: {sorted(WIRE_DTYPES)}")
    return name


def wire_name_of_torch(dtype: object) -> str:
    """Wire name of a torch dtype (given as the dtype object); raises TypeError if not allowed."""
    name = _TORCH_TO_WIRE.get(str(dtype))
    if name is None:
        raise TypeError(f"dtype {dtype} cannot be sent on the wire; allowed: {sorted(WIRE_DTYPES)}")
    return name
