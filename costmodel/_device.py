"""Accelerator descriptions: peak FLOP/s per dtype, memory size, memory bandwidth.

A :class:`DeviceSpec` is an immutable record of datasheet numbers. Attained rates are
lower than these peaks; the fractions attained live in :mod:`meshplan.costmodel._compute`
(``Efficiency``), not here, so a spec always states what the vendor states.

The presets at the bottom (``A100_80GB``, ``H100_80GB``, ...) are frozen, hence immutable,
module-level constants; every number cites its source.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "DeviceSpec",
    "A100_80GB",
    "A100_40GB",
    "H100_80GB",
    "V100_32GB",
    "CPU",
]

# Read-only alias table (a MappingProxyType cannot be mutated): short names people write
# in cluster files -> the canonical numpy / ml_dtypes names used as keys of `peak_flops`.
_DTYPE_ALIASES = types.MappingProxyType({
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "fp32": "float32",
    "f32": "float32",
    "single": "float32",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
    "tf32": "tensorfloat32",
    "fp8": "float8_e4m3fn",
    "s8": "int8",
    "u8": "uint8",
})

_DEVICE_KEYS = ("kind", "peak_flops", "memory_bytes", "memory_bandwidth")


# ----------------------------------------------------------------------------------------
# Small validators shared with _cluster.py. They raise ValueError naming `where` (the field
# at fault) and the expected form, so a bad cluster file points at its bad line.


def _check_number(value: Any, where: str, what: str, *, allow_zero: bool = False) -> float:
    """Return `value` as a finite float > 0 (or >= 0 with allow_zero), else ValueError."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where} must be a finite number {bound} ({what}); got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        raise ValueError(f"{where} must be a finite number {bound} ({what}); got {value!r}")
    return out


def _check_int(value: Any, where: str, *, minimum: int = 0) -> int:
    """Return `value` as an int >= minimum, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where} must be an integer >= {minimum}; got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string; got {value!r}")
    return value


def dtype_name(dtype: Any) -> str:
    """Canonical name of a dtype given as a name, numpy/jax dtype, or scalar type.

    >>> import numpy as np
    >>> dtype_name("bf16"), dtype_name(np.float32), dtype_name("tf32")
    ('bfloat16', 'float32', 'tensorfloat32')
    """
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        name = _DTYPE_ALIASES.get(name, name)
        if name == "tensorfloat32":  # not a storage dtype; numpy does not know it
            return name
        try:
            return np.dtype(name).name
        except TypeError:
            return name  # an unknown name is kept; flops_per_second falls back
    try:
        return np.dtype(dtype).name
    except TypeError:
        name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None)
        if isinstance(name, str):
            return dtype_name(name)
        raise TypeError(
            f"cannot interpret {dtype!r} as a dtype; pass a dtype name such as 'bfloat16' "
            "or a numpy/jax dtype such as jnp.bfloat16") from None


def _is_narrow(name: str) -> bool:
    """8-bit-or-narrower types (int8, uint8, int4, float8_*, ...): tensor-unit types."""
    return name.startswith(("float8_", "float6_", "float4_")) or name in (
        "int8", "uint8", "int4", "uint4", "int2", "uint2")


# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet numbers of one accelerator.

    Attributes:
      kind: a name such as ``"A100-SXM4-80GB"``.
      peak_flops: ``(dtype name, FLOP/s)`` pairs, dense (no structured sparsity). Must
        include ``"float32"``: it is the fallback for unlisted dtypes. ``"tensorfloat32"``
        is the rate of float32 matmuls when TF32 is allowed. Given as pairs or a mapping;
        stored as pairs sorted by name, so equal specs compare equal.
      memory_bytes: device memory, bytes.
      memory_bandwidth: device memory bandwidth, bytes/s.

    Example:

    >>> d = DeviceSpec("toy", (("float32", 1e12), ("bfloat16", 4e12)), 16e9, 1e12)
    >>> d.flops_per_second("bfloat16"), d.flops_per_second("float64")
    (4000000000000.0, 1000000000000.0)
    >>> DeviceSpec.from_dict(d.to_dict()) == d
    True
    """

    kind: str
    peak_flops: tuple[tuple[str, float], ...]
    memory_bytes: float
    memory_bandwidth: float

    def __post_init__(self):
        _check_str(self.kind, "DeviceSpec.kind")
        pairs = self.peak_flops
        if isinstance(pairs, Mapping):
            pairs = tuple(pairs.items())
        try:
            pairs = tuple(tuple(p) for p in pairs)
        except TypeError:
            raise ValueError(
                f"DeviceSpec.peak_flops of {self.kind!r} must be (dtype name, FLOP/s) pairs "
                f"such as (('bfloat16', 312e12), ('float32', 19.5e12)); got {self.peak_flops!r}"
            ) from None
        table: dict[str, float] = {}
        for k, p in enumerate(pairs):
            where = f"DeviceSpec.peak_flops[{k}] of {self.kind!r}"
            if len(p) != 2:
                raise ValueError(f"{where} must be a (dtype name, FLOP/s) pair; got {p!r}")
            name = dtype_name(_check_str(p[0], where + " dtype name"))
            if name in table:
                raise ValueError(f"{where}: dtype {name!r} is listed twice; list it once")
            table[name] = _check_number(p[1], f"{where} ({name})", "FLOP/s")
        if "float32" not in table:
            raise ValueError(
                f"DeviceSpec.peak_flops of {self.kind!r} has no 'float32' entry (got "
                f"{sorted(table)}); add one: it is the rate used for dtypes not listed")
        object.__setattr__(self, "peak_flops", tuple(sorted(table.items())))
        object.__setattr__(self, "memory_bytes", _check_number(
            self.memory_bytes, f"DeviceSpec.memory_bytes of {self.kind!r}", "bytes"))
        object.__setattr__(self, "memory_bandwidth", _check_number(
            self.memory_bandwidth, f"DeviceSpec.memory_bandwidth of {self.kind!r}", "bytes/s"))

    def flops_per_second(self, dtype: Any) -> float:
        """Peak dense FLOP/s for arithmetic in `dtype` (a name or a numpy/jax dtype).

        Lookup order: the dtype's own entry; for 8-bit-or-narrower types (int8, uint8,
        int4, float8_*) that are not listed, the ``bfloat16`` entry (they run on the same
        tensor units, so bf16 is a conservative stand-in) and then ``float32``; for any
        other unlisted dtype (float64, int32, bool, ...), the ``float32`` entry.

        >>> A100_80GB.flops_per_second("bfloat16")
        312000000000000.0
        >>> V100_32GB.flops_per_second("bfloat16") == V100_32GB.flops_per_second("float32")
        True
        """
        name = dtype_name(dtype)
        table = dict(self.peak_flops)
        if name in table:
            return table[name]
        if _is_narrow(name) and "bfloat16" in table:
            return table["bfloat16"]
        return table["float32"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"kind", "peak_flops": {dtype: FLOP/s}, "memory_bytes",
        "memory_bandwidth"}``."""
        return {
            "kind": self.kind,
            "peak_flops": dict(self.peak_flops),
            "memory_bytes": self.memory_bytes,
            "memory_bandwidth": self.memory_bandwidth,
        }

    @classmethod
    def from_dict(cls, data: Any) -> DeviceSpec:
        """Inverse of :meth:`to_dict`, validating every field (ValueError names it).

        >>> DeviceSpec.from_dict({"kind": "x", "peak_flops": {"float32": 1e12},
        ...                       "memory_bytes": 8e9})
        Traceback (most recent call last):
        ...
        ValueError: DeviceSpec.memory_bandwidth is missing; expected ...
        """
        return _device_from_dict(data, "DeviceSpec")


def _device_from_dict(data: Any, where: str) -> DeviceSpec:
    """Parse a device dict; every error names `where` plus the field."""
    expected = {
        "kind": "a name such as 'A100-SXM4-80GB'",
        "peak_flops": "an object {dtype name: FLOP/s} that includes 'float32'",
        "memory_bytes": "a number of bytes, e.g. 80e9",
        "memory_bandwidth": "a number of bytes/s, e.g. 2.039e12",
    }
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{where} must be an object with keys {list(_DEVICE_KEYS)}; got {data!r}")
    for key in _DEVICE_KEYS:
        if key not in data:
            raise ValueError(f"{where}.{key} is missing; expected {expected[key]}")
    extra = sorted(set(data) - set(_DEVICE_KEYS))
    if extra:
        raise ValueError(f"{where} has unknown keys {extra}; allowed keys: {list(_DEVICE_KEYS)}")
    kind = _check_str(data["kind"], f"{where}.kind")
    flops = data["peak_flops"]
    if not isinstance(flops, Mapping):
        raise ValueError(f"{where}.peak_flops must be {expected['peak_flops']}; got {flops!r}")
    pairs = []
    for name, value in flops.items():
        pairs.append((_check_str(name, f"{where}.peak_flops key"),
                      _check_number(value, f"{where}.peak_flops[{name!r}]", "FLOP/s")))
    try:
        return DeviceSpec(
            kind=kind,
            peak_flops=tuple(pairs),
            memory_bytes=_check_number(data["memory_bytes"], f"{where}.memory_bytes", "bytes"),
            memory_bandwidth=_check_number(
                data["memory_bandwidth"], f"{where}.memory_bandwidth", "bytes/s"),
        )
    except (TypeError, ValueError) as e:
        msg = str(e)  # the field checks name `where` already; DeviceSpec's own do not
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None


# ----------------------------------------------------------------------------------------
# Presets. Dense (non-sparse) peak rates; "GB" is 1e9 bytes as on the datasheets. The
# usable memory is a little less (CUDA context, allocator reserve); plans leave headroom
# through their memory limit, not by editing these numbers.

A100_80GB = DeviceSpec(
    kind="A100-SXM4-80GB",
    # NVIDIA A100 Tensor Core GPU datasheet (2021), SXM column: BF16/FP16 tensor 312 TFLOP/s,
    # TF32 tensor 156, FP32 19.5, FP64 9.7 (FP64 tensor 19.5), INT8 tensor 624 TOPS; all
    # dense (the "*" figures with sparsity are twice these).
    peak_flops=(("bfloat16", 312e12), ("float16", 312e12), ("tensorfloat32", 156e12),
                ("float32", 19.5e12), ("float64", 9.7e12), ("int8", 624e12)),
    memory_bytes=80e9,          # same datasheet: 80 GB HBM2e
    memory_bandwidth=2.039e12,  # same datasheet: 2,039 GB/s (A100 80GB SXM)
)

A100_40GB = DeviceSpec(
    kind="A100-SXM4-40GB",
    # NVIDIA A100 datasheet: the same compute as the 80 GB part (same GA100 configuration).
    peak_flops=(("bfloat16", 312e12), ("float16", 312e12), ("tensorfloat32", 156e12),
                ("float32", 19.5e12), ("float64", 9.7e12), ("int8", 624e12)),
    memory_bytes=40e9,          # same datasheet: 40 GB HBM2
    memory_bandwidth=1.555e12,  # same datasheet: 1,555 GB/s
)

H100_80GB = DeviceSpec(
    kind="H100-SXM5-80GB",
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column, dense = half the "with sparsity"
    # figures: BF16/FP16 1,979 -> 989 TFLOP/s, TF32 989 -> 494.5, FP8 and INT8 3,958 -> 1,979;
    # FP32 67, FP64 34 (FP64 tensor 67).
    peak_flops=(("bfloat16", 989e12), ("float16", 989e12), ("tensorfloat32", 494.5e12),
                ("float32", 67e12), ("float64", 34e12), ("float8_e4m3fn", 1979e12),
                ("float8_e5m2", 1979e12), ("int8", 1979e12)),
    memory_bytes=80e9,          # same datasheet: 80 GB HBM3
    memory_bandwidth=3.35e12,   # same datasheet: 3.35 TB/s
)

V100_32GB = DeviceSpec(
    kind="V100-SXM2-32GB",
    # NVIDIA Tesla V100 datasheet, SXM2 column: tensor (FP16) 125 TFLOP/s, single 15.7,
    # double 7.8. Volta has no bfloat16 tensor cores, so bfloat16 is deliberately absent
    # and falls back to the float32 rate.
    peak_flops=(("float16", 125e12), ("float32", 15.7e12), ("float64", 7.8e12)),
    memory_bytes=32e9,          # same datasheet: 32 GB HBM2
    memory_bandwidth=900e9,     # same datasheet: 900 GB/s
)

CPU = DeviceSpec(
    kind="cpu",
    # A generic stand-in for one CPU-emulated JAX device, used by Cluster.local() until
    # calibration measures the machine. Rough order of magnitude, not a datasheet: one
    # ~3 GHz core with two 256-bit FMA units peaks near 3e9 * 32 = 96 GFLOP/s float32 and
    # half that in float64; emulated devices share the host's cores, hence ~50 GFLOP/s.
    # bfloat16 is absent: XLA:CPU computes it through float32.
    peak_flops=(("float32", 50e9), ("float64", 25e9)),
    memory_bytes=float(16 * 2**30),  # 16 GiB: a modest share of a host's RAM
    memory_bandwidth=20e9,  # about one DDR4-3200 channel (25.6 GB/s peak), rounded down
)


def _presets_by_kind() -> dict[str, DeviceSpec]:
    """Fresh dict of the presets by kind (a function, so there is no mutable global)."""
    return {d.kind: d for d in (A100_80GB, A100_40GB, H100_80GB, V100_32GB, CPU)}
