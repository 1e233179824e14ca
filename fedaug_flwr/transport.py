"""Model weights in Flower messages: ArrayRecord <-> torch state dict, and FedAvg's mean.

Flower stores each ``Array`` as the bytes of a ``.npy`` file. ``Array.numpy()``
reads them with ``np.load``, which parses every array's header with
``ast.literal_eval``; ``Array.from_numpy_ndarray`` writes them with
``np.save``. ExquisiteNetV1 has 134 arrays, so each message cost about 10 ms
to read and 10 ms to write: most of what a client did per message once the
training is taken away (py-spy profile, docs/performance.md).

Here a header is skipped by its length field and the data is read with
``np.frombuffer``; writing reuses one header per (dtype, shape). The bytes are
exactly those of ``np.save``, so Flower's own code (and any other reader)
reads them as before, and an array this module does not recognise is handed
to Flower's reader. The server's FedAvg mean uses the same reader, with
Flower's arithmetic unchanged, so the results are identical bit for bit
(``tests/test_performance.py``).
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
_NPY_MAGIC = b"\x93NUMPY"


@lru_cache(maxsize=4096)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """What ``np.save`` writes before the data of a C-ordered array of this dtype and shape."""
    dtype = np.dtype(descr)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=dtype), allow_pickle=False)
    data = buffer.getvalue()
    return data[: len(data) - math.prod(shape) * dtype.itemsize]


def to_array(ndarray: np.ndarray) -> Array:
    """The ``Array`` that ``Array.from_numpy_ndarray`` would build, without ``np.save``."""
    if ndarray.dtype.hasobject:
        return Array.from_numpy_ndarray(ndarray)
    if not ndarray.flags.c_contiguous:
        ndarray = ndarray.copy(order="C")
    header = _npy_header(ndarray.dtype.str, tuple(ndarray.shape))
    return Array(
        dtype=str(ndarray.dtype),
        shape=tuple(ndarray.shape),
        stype=NUMPY_STYPE,
        data=header + ndarray.tobytes(),
    )


def from_array(array: Array, copy: bool = True) -> np.ndarray:
    """The (writable) ndarray that ``array.numpy()`` returns, without ``np.load``.

    ``copy=False``: a read-only view of the message's bytes, to look at only. Bytes
    whose header does not describe the array's own dtype and shape go to Flower's reader.
    """
    data = array.data
    if array.stype != NUMPY_STYPE or not data.startswith(_NPY_MAGIC):
        return array.numpy()
    major = data[6]
    length_bytes = 2 if major == 1 else 4 if major in (2, 3) else 0
    dtype = np.dtype(array.dtype)
    if not length_bytes or dtype.hasobject:
        return array.numpy()
    start = 8 + length_bytes
    offset = start + int.from_bytes(data[8:start], "little")
    header = data[start:offset]
    shape = tuple(array.shape)
    # Anything but the plain C-ordered layout np.save writes for this dtype and shape:
    # Flower's reader.
    if (
        b"'fortran_order': False" not in header
        or f"'descr': '{dtype.str}'".encode() not in header
        or f"'shape': {shape!r}".encode() not in header
    ):
        return array.numpy()
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    # a copy, as np.load's: writable, not tied to the bytes
    return flat.reshape(shape).copy() if copy else flat.reshape(shape)


def to_record(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state_dict)``, faster."""
    record = ArrayRecord()
    for name, tensor in state_dict.items():
        record[name] = to_array(tensor.detach().cpu().numpy())
    return record


def to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``, faster."""
    return OrderedDict(
        (name, torch.from_numpy(from_array(array))) for name, array in record.items()
    )


def weighted_mean(records: Sequence[ArrayRecord], weights: Sequence[float | int]) -> ArrayRecord:
    """FedAvg's mean of the records, exactly as ``flwr``'s ``aggregate_arrayrecords``.

    The same operations in the same order (each array times its weight
    factor, summed in place in record order) give the same bits, dtypes
    included (an int64 counter becomes float64, as in Flower). The replies are
    checked before (:mod:`fedaug_flwr.replies`); weights that would divide by zero
    or flip signs are refused here too.
    """
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"FedAvg weights must be finite numbers > 0; got {list(weights)}")
    total = sum(weights)
    factors = [weight / total for weight in weights]
    mean: dict[str, np.ndarray] = {}
    for record, factor in zip(records, factors, strict=True):
        for name, array in record.items():
            if name not in mean:
                mean[name] = from_array(array) * factor
            else:
                mean[name] += from_array(array) * factor
    return ArrayRecord({name: to_array(np.asarray(value)) for name, value in mean.items()})
