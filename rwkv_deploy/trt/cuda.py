"""Device memory and streams for the TensorRT Session, through NVIDIA's CUDA Python bindings (cuda-python).

A small pool keeps freed buffers by size: a generation loop makes one new State per step and drops the one
before, so after two steps the same two sets of buffers alternate (ping-pong) without a cudaMalloc per token.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..errors import RWKVDeployError
from . import INSTALL


def runtime():
    """cuda.bindings.runtime (cuda-python >= 12.6), or an RWKVDeployError naming the extra."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        raise RWKVDeployError(f"the TensorRT backend needs NVIDIA's CUDA Python bindings (cuda-python): {INSTALL}")
    return rt


def check(result):
    """A cuda-python call's (error, *values) -> values; an error raises with its CUDA name."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {int(err)} ({getattr(err, 'name', err)})")
    return values[0] if len(values) == 1 else values


def no_gpu_reason() -> str | None:
    """None if a CUDA device is usable here, else why not (no bindings, no driver, no device), in words."""
    try:
        rt = runtime()
    except RWKVDeployError as e:
        return str(e)
    err, n = rt.cudaGetDeviceCount()
    if int(err) != 0:
        return f"no usable CUDA GPU here (cudaGetDeviceCount: {getattr(err, 'name', err)})"
    return None if n > 0 else "no CUDA GPU on this machine"


class DeviceBuffer:
    """nbytes of device memory; given back to its pool when the last reference goes."""

    __slots__ = ("ptr", "nbytes", "_pool")

    def __init__(self, ptr: int, nbytes: int, pool: "DevicePool"):
        self.ptr, self.nbytes, self._pool = ptr, nbytes, pool

    def __del__(self):
        self._pool._release(self.ptr, self.nbytes)


class DevicePool:
    """cudaMalloc'd buffers reused by size (the state tensors of one model come in a few sizes only)."""

    def __init__(self):
        self.rt = runtime()
        self._free: dict[int, list[int]] = defaultdict(list)
        self.allocations = 0  # cudaMalloc calls, for tests of the ping-pong reuse
        self.closed = False

    def alloc(self, nbytes: int) -> DeviceBuffer:
        nbytes = max(int(nbytes), 1)
        free = self._free[nbytes]
        if free:
            return DeviceBuffer(free.pop(), nbytes, self)
        self.allocations += 1
        return DeviceBuffer(int(check(self.rt.cudaMalloc(nbytes))), nbytes, self)

    def _release(self, ptr: int, nbytes: int) -> None:
        if self.closed:  # a State kept past close(): nothing will reuse its memory
            check(self.rt.cudaFree(ptr))
        else:
            self._free[nbytes].append(ptr)

    def close(self) -> None:
        """cudaFree every pooled buffer; buffers still held are freed when their last reference goes."""
        self.closed = True
        for ptrs in self._free.values():
            while ptrs:
                check(self.rt.cudaFree(ptrs.pop()))
        self._free.clear()


class DeviceArray:
    """A typed view of a DeviceBuffer: what a TensorRT State holds per tensor."""

    __slots__ = ("buffer", "shape", "dtype")

    def __init__(self, buffer: DeviceBuffer, shape: tuple, dtype):
        self.buffer, self.shape, self.dtype = buffer, tuple(shape), np.dtype(dtype)

    @property
    def ptr(self) -> int:
        return self.buffer.ptr


class Stream:
    """One CUDA stream with the copies the Session needs (async on the stream; `sync` waits)."""

    def __init__(self, pool: DevicePool):
        self.rt, self.pool = pool.rt, pool
        self.handle = check(self.rt.cudaStreamCreate())

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def empty(self, shape, dtype) -> DeviceArray:
        return DeviceArray(self.pool.alloc(int(np.prod(shape)) * np.dtype(dtype).itemsize), shape, dtype)

    def upload(self, host: np.ndarray, into: DeviceArray | None = None) -> DeviceArray:
        host = np.ascontiguousarray(host)
        dev = into or self.empty(host.shape, host.dtype)
        check(self.rt.cudaMemcpyAsync(dev.ptr, host.ctypes.data, host.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle))
        self.sync()  # the host array may go away as soon as we return
        return dev

    def download(self, dev: DeviceArray) -> np.ndarray:
        host = np.empty(dev.shape, dev.dtype)
        check(self.rt.cudaMemcpyAsync(host.ctypes.data, dev.ptr, host.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle))
        self.sync()
        return host

    def sync(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        """Wait for the stream, free the pool and destroy the stream."""
        self.sync()
        self.pool.close()
        check(self.rt.cudaStreamDestroy(self.handle))
