"""Compute time of one operation: a roofline with named, sourced efficiency factors.

``time = max(FLOPs / (peak FLOP/s * efficiency), bytes / (memory bandwidth * memory
efficiency))``: an operation is bound either by arithmetic or by memory traffic (Williams,
Waterman & Patterson, "Roofline: an insightful visual performance model for multicore
architectures", CACM 52(4), 2009).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meshplan.costmodel._device import DeviceSpec, _check_number

__all__ = ["Efficiency", "op_time", "compute_time"]


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peaks that real kernels attain (each in (0, 1]).

    Attributes:
      matmul: of peak tensor FLOP/s, for matmuls and convolutions. Default 0.7: Dao,
        "FlashAttention-2" (2023), trains GPT-style models end to end at up to 225 TFLOP/s
        per A100 (72% of its 312 TFLOP/s bf16 peak), so the matmuls themselves reach at
        least that. (Narayanan et al., SC'21, report 44-52% end to end with Megatron-LM;
        that figure also absorbs communication, pipeline bubbles, recomputation and
        element-wise work, which the model prices separately.) Calibration replaces it.
      elementwise: of the vector (non-tensor) FLOP/s, for every other op. Default 0.5. No
        public measurement pins it: these ops are almost always memory-bound (A100's fp32
        ridge point is 19.5e12 / 2.039e12 ~ 10 FLOP/byte), so this factor only matters for
        arithmetic-heavy fusions (many transcendentals per element); calibration replaces it.
      memory: of datasheet memory bandwidth. Default 0.8: STREAM-like copy/triad kernels
        (McCalpin's STREAM; BabelStream, Deakin et al. 2018) typically reach about 80-90% of
        the datasheet HBM bandwidth on recent NVIDIA GPUs; 0.8 is the conservative end.

    >>> Efficiency()
    Efficiency(matmul=0.7, elementwise=0.5, memory=0.8)
    >>> Efficiency(matmul=1.5)
    Traceback (most recent call last):
    ...
    ValueError: Efficiency.matmul must be in (0, 1] (a fraction of peak); got 1.5
    """

    matmul: float = 0.7
    elementwise: float = 0.5
    memory: float = 0.8

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            where = f"Efficiency.{field.name}"
            try:
                value = _check_number(value, where, "a fraction of peak")
            except ValueError:
                value = None
            if value is None or value > 1:
                raise ValueError(
                    f"{where} must be in (0, 1] (a fraction of peak); got "
                    f"{getattr(self, field.name)!r}")
            object.__setattr__(self, field.name, value)


def op_time(flops: float, bytes_accessed: float, device: DeviceSpec, dtype: Any,
            is_matmul: bool, efficiency: Efficiency = Efficiency()) -> float:
    """Seconds for one operation on `device`, by the roofline.

    Matmuls and convolutions (``is_matmul=True``) run at ``device.flops_per_second(dtype)
    * efficiency.matmul``. Other ops run on the vector units, which do not reach tensor-core
    rates: ``min(flops_per_second(dtype), flops_per_second("float32")) *
    efficiency.elementwise``. Memory traffic runs at ``memory_bandwidth * efficiency.memory``.

    Args:
      flops: floating-point operations of the op (a multiply-add counts 2).
      bytes_accessed: bytes read plus written from device memory.
      device: the :class:`DeviceSpec` it runs on.
      dtype: the arithmetic dtype (a name or numpy/jax dtype).
      is_matmul: whether the op runs on the tensor units.
      efficiency: attained fractions of peak.

    >>> from meshplan.costmodel import A100_80GB
    >>> op_time(218.4e12, 0, A100_80GB, "bfloat16", is_matmul=True)  # 0.7 s of peak at 70%
    1.0
    >>> op_time(0, 2.039e12, A100_80GB, "bfloat16", is_matmul=False)  # memory-bound
    1.25
    """
    flops = _check_number(flops, "flops", "FLOPs", allow_zero=True)
    nbytes = _check_number(bytes_accessed, "bytes_accessed", "bytes", allow_zero=True)
    if not isinstance(device, DeviceSpec):
        raise TypeError(f"device must be a DeviceSpec (e.g. A100_80GB); got {device!r}")
    if not isinstance(efficiency, Efficiency):
        raise TypeError(f"efficiency must be an Efficiency; got {efficiency!r}")
    if is_matmul:
        rate = device.flops_per_second(dtype) * efficiency.matmul
    else:
        rate = (min(device.flops_per_second(dtype), device.flops_per_second("float32"))
                * efficiency.elementwise)
    return max(flops / rate, nbytes / (device.memory_bandwidth * efficiency.memory))


def compute_time(flops: float, bytes_accessed: float, device: DeviceSpec, dtype: Any,
                 efficiency: Efficiency = Efficiency()) -> float:
    """Roofline seconds of matmul-like work: ``op_time(..., is_matmul=True)``.

    ``max(flops / (peak(dtype) * efficiency.matmul), bytes / (memory_bandwidth *
    efficiency.memory))``.

    >>> from meshplan.costmodel import H100_80GB
    >>> compute_time(692.3e12, 0, H100_80GB, "bfloat16")
    1.0
    """
    return op_time(flops, bytes_accessed, device, dtype, True, efficiency)
