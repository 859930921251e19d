"""The few CUDA driver calls the cuda_ipc connector needs, through ctypes on libcuda.

Why the driver API and not torch: torch shares CUDA memory between processes only through
torch.multiprocessing (pickled storages, a ref-count file per tensor, and a CUDA context on the
*producer's* device in every consumer: hundreds of MB on a GPU that is not the consumer's). The
driver's IPC calls map a peer allocation into the consumer's own context with peer access, and one
`cuMemcpyDtoDAsync` on the consumer's stream moves the bytes over NVLink (or PCIe) with no host hop.

libcuda.so.1 ships with the driver (not with torch), so this loads wherever a GPU works and its ABI
is stable; nothing here is imported on a machine without CUDA.
"""

from __future__ import annotations

import ctypes
import functools

_IPC_HANDLE_BYTES = 64
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * _IPC_HANDLE_BYTES)]


class CudaDriverError(RuntimeError):
    pass


@functools.cache
def _lib() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise CudaDriverError(f"cannot load the CUDA driver (libcuda.so.1): {exc}") from exc


def _fn(*names: str) -> ctypes._CFuncPtr:
    """The first of `names` the driver exports (versioned symbols such as cuIpcOpenMemHandle_v2)."""
    for name in names:
        fn = getattr(_lib(), name, None)
        if fn is not None:
            fn.restype = ctypes.c_int
            return fn
    raise CudaDriverError(f"the CUDA driver exports none of {names}")


def _check(status: int, what: str) -> None:
    if status == 0:
        return
    message = ctypes.c_char_p()
    _fn("cuGetErrorString")(status, ctypes.byref(message))
    text = message.value.decode() if message.value else "unknown error"
    raise CudaDriverError(f"{what} failed: CUDA error {status} ({text})")


def ensure_context(device_index: int) -> None:
    """Make `device_index`'s primary context (the one torch uses) current on this thread."""
    current = ctypes.c_void_p()
    _check(_fn("cuCtxGetCurrent")(ctypes.byref(current)), "cuCtxGetCurrent")
    device = ctypes.c_int()
    _check(_fn("cuDeviceGet")(ctypes.byref(device), device_index), "cuDeviceGet")
    if current.value:
        current_device = ctypes.c_int()
        _check(_fn("cuCtxGetDevice")(ctypes.byref(current_device)), "cuCtxGetDevice")
        if current_device.value == device.value:
            return
    primary = ctypes.c_void_p()
    _check(_fn("cuDevicePrimaryCtxRetain")(ctypes.byref(primary), device), "cuDevicePrimaryCtxRetain")
    _check(_fn("cuCtxSetCurrent")(primary), "cuCtxSetCurrent")


def export_allocation(pointer: int) -> tuple[bytes, int]:
    """(IPC handle of the allocation holding `pointer`, `pointer`'s offset inside it).

    IPC handles name whole allocations; torch's caching allocator may place a tensor inside a larger
    one, so the handle is taken on the base address and the offset travels with it.
    """
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(
        _fn("cuMemGetAddressRange_v2", "cuMemGetAddressRange")(
            ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer)
        ),
        "cuMemGetAddressRange",
    )
    handle = _IpcMemHandle()
    _check(_fn("cuIpcGetMemHandle")(ctypes.byref(handle), base), "cuIpcGetMemHandle")
    return bytes(handle), pointer - base.value  # bytes(handle.reserved) would stop at the first NUL


def open_allocation(handle: bytes) -> int:
    """Map a peer process's allocation into the current context; its base address here."""
    if len(handle) != _IPC_HANDLE_BYTES:
        raise ValueError(f"an IPC handle is {_IPC_HANDLE_BYTES} bytes, got {len(handle)}")
    pointer = ctypes.c_uint64()
    _check(
        _fn("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")(
            ctypes.byref(pointer), _IpcMemHandle.from_buffer_copy(handle), _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
        ),
        "cuIpcOpenMemHandle",
    )
    return pointer.value


def close_allocation(pointer: int) -> None:
    _check(_fn("cuIpcCloseMemHandle")(ctypes.c_uint64(pointer)), "cuIpcCloseMemHandle")


def copy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Device-to-device copy of `nbytes` on `stream` (a cudaStream_t / CUstream as an int); either
    side may be a mapped peer allocation: the driver routes it over NVLink or PCIe."""
    _check(
        _fn("cuMemcpyDtoDAsync_v2", "cuMemcpyDtoDAsync")(
            ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes), ctypes.c_void_p(stream)
        ),
        "cuMemcpyDtoDAsync",
    )
