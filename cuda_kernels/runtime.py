"""Run-time compilation and launch of the .cu kernels (CuPy RawModule / NVRTC).

Contract:
- get_kernel(source, name_expression) compiles ``common.cuh + <source>`` once per
  (source, template instantiation, device) and returns the CuPy RawKernel; later calls hit the
  in-process cache (CuPy also keeps compiled binaries on disk across processes).
- launch(kernel, grid, block, args, device, shared_mem) launches on torch's CURRENT stream of
  that device, so it orders with surrounding torch work; tensors are passed zero-copy as raw
  device pointers (ptr()), scalars as explicitly sized numpy scalars (i32/i64/f32).
Only imported on the CUDA path (cupy is an optional dependency: the `gpu` extra).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import cupy
import numpy as np
import torch

_SRC_DIR = Path(__file__).resolve().parent
# The C++ element type (common.cuh) of each torch dtype the kernels take.
DTYPE_TAGS = {torch.bfloat16: "bf16_t", torch.float16: "f16_t"}
_OPTIONS = ("--std=c++17",)


@functools.cache
def _source(names: tuple[str, ...]) -> str:
    parts = [(_SRC_DIR / n).read_text() for n in ("common.cuh", *names)]
    return "\n".join(parts)


@functools.cache
def _module(source: tuple[str, ...], name_expressions: tuple[str, ...], device_index: int) -> Any:
    with cupy.cuda.Device(device_index):
        mod = cupy.RawModule(
            code=_source(source), options=_OPTIONS, name_expressions=name_expressions
        )
        mod.compile()
    return mod


def get_kernel(
    source: str | tuple[str, ...],
    name_expression: str,
    device: torch.device,
    group: tuple[str, ...] = (),
) -> Any:
    """Compiled kernel `name_expression` from `source` (one .cu or several, concatenated in
    order after common.cuh); `group` = instantiations compiled into the same module."""
    names = (source,) if isinstance(source, str) else source
    exprs = tuple(sorted({name_expression, *group}))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _function(names, exprs, index, name_expression)


@functools.cache
def _function(
    names: tuple[str, ...], exprs: tuple[str, ...], device_index: int, name_expression: str
) -> Any:
    # NOTE: cached so each kernel is ONE long-lived object (allow_dynamic_smem keys on it).
    return _module(names, exprs, device_index).get_function(name_expression)


_SMEM_SET: set[tuple[int, int]] = set()


def allow_dynamic_smem(kernel: Any, nbytes: int) -> None:
    """Allow `nbytes` of dynamic shared memory (past the 48 KiB default; once per kernel)."""
    key = (id(kernel), nbytes)
    if nbytes > 0 and key not in _SMEM_SET:  # NOTE: static + dynamic > 48 KiB needs it too
        kernel.max_dynamic_shared_size_bytes = nbytes
        _SMEM_SET.add(key)


def ptr(t: torch.Tensor) -> np.uint64:
    """Raw device pointer of a tensor, as a kernel argument."""
    return np.uint64(t.data_ptr())


def ptr_at(t: torch.Tensor, byte_offset: int) -> np.uint64:
    """Raw device pointer `byte_offset` bytes into a tensor's storage."""
    return np.uint64(t.data_ptr() + byte_offset)


def kernel_attributes(kernel: Any) -> dict[str, int]:
    """Compiler resource figures of a compiled kernel (registers, local/shared bytes)."""
    attrs = kernel.attributes
    keys = ("num_regs", "local_size_bytes", "shared_size_bytes", "max_threads_per_block")
    return {k: int(attrs[k]) for k in keys if k in attrs}


def i32(x: int) -> np.int32:
    return np.int32(x)


def i64(x: int) -> np.int64:
    return np.int64(x)


def f32(x: float) -> np.float32:
    return np.float32(x)


def launch(
    kernel: Any,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: tuple[Any, ...],
    device: torch.device,
    shared_mem: int = 0,
) -> None:
    """Launch on torch's current stream of `device` (asynchronous, like any torch op)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _cupy_stream(torch.cuda.current_stream(index).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        kernel(grid, block, args, shared_mem=shared_mem)


@functools.cache
def _cupy_stream(handle: int, device_index: int) -> Any:
    # NOTE: one wrapper per torch stream handle, built once (construction is not free and
    # newer CuPy warns that ExternalStream is deprecated in favour of Stream.from_external).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(handle, device_index)


@functools.cache
def num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)
