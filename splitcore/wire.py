"""Tensors on the wire: a small self-describing binary frame, never JSON floats and never pickle.

Frame layout (little-endian)::

    b"SPT1" | dtype code: u8 | rank: u8 | reserved: u16 = 0 | dims: u32 * rank | raw row-major data

A [1, 1, 576] fp16 hidden state is 20 bytes of framing plus 1152 bytes of data.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from splitcore.errors import WireError

MAGIC = b"SPT1"
MEDIA_TYPE = "application/x-split-tensor"
_HEADER = struct.Struct("<4sBBH")
DTYPE_CODES = {1: np.dtype("<f2"), 2: np.dtype("<f4"), 3: np.dtype("<i8")}
CODES = {dtype: code for code, dtype in DTYPE_CODES.items()}
MAX_RANK = 8


def encode(array: np.ndarray) -> bytes:
    dtype = array.dtype.newbyteorder("<")
    if dtype not in CODES:
        raise WireError(f"cannot send dtype {array.dtype}; the wire carries {sorted(d.name for d in CODES)}")
    header = _HEADER.pack(MAGIC, CODES[dtype], array.ndim, 0) + struct.pack(f"<{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def decode(body: bytes) -> np.ndarray:
    """Parse a frame; every way a frame can be wrong is a WireError that says what was expected."""
    if len(body) < _HEADER.size:
        raise WireError(f"body of {len(body)} bytes is shorter than the {_HEADER.size}-byte tensor frame header")
    magic, code, rank, reserved = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise WireError(f"body does not start with the tensor frame magic {MAGIC!r} (content type {MEDIA_TYPE})")
    if code not in DTYPE_CODES:
        raise WireError(f"unknown dtype code {code}; expected one of {sorted(DTYPE_CODES)} (1=float16, 2=float32)")
    if rank > MAX_RANK or reserved:
        raise WireError(f"malformed frame header (rank {rank}, reserved {reserved})")
    dims_end = _HEADER.size + 4 * rank
    if len(body) < dims_end:
        raise WireError(f"frame declares rank {rank} but ends before its dimensions")
    shape = struct.unpack_from(f"<{rank}I", body, _HEADER.size)
    dtype = DTYPE_CODES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: dims whose product overflows int64 stay large
    if len(body) - dims_end != expected:
        raise WireError(
            f"frame of shape {list(shape)} {dtype.name} needs {expected} data bytes, got {len(body) - dims_end}"
        )
    return np.frombuffer(body, dtype=dtype, offset=dims_end).reshape(shape)
