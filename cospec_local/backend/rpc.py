"""llama.cpp's RPC backend (remote devices): reaching and registering RPC servers, this machine's
own offload devices, and serving them to other machines (`cospec-local rpc-server`)."""

from __future__ import annotations

import ctypes
import os
import socket
import sys

from ..errors import RpcError
from ._lib import _ggml, _init_backend

RPC_CONNECT_TIMEOUT = 5.0  # seconds to reach a server before giving up with a clear error
_GGML_DEVICE_TYPE_CPU, _GGML_DEVICE_TYPE_GPU, _GGML_DEVICE_TYPE_IGPU = 0, 1, 2
_rpc_devices: dict[str, list[int]] = {}  # endpoint -> its registered device pointers


def _rpc_proc(name: str, restype, *argtypes):
    """A function of llama.cpp's RPC backend, or RpcError when this build has none."""
    import llama_cpp

    _init_backend(None)
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC") if llama_cpp.llama_supports_rpc() else None
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise RpcError(
            "this build of llama-cpp-python has no RPC backend: rebuild it with -DGGML_RPC=ON in CMAKE_ARGS "
            "(the Makefile's default does so; add it to your own CMAKE_ARGS for CUDA or Metal builds)"
        )
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port); RpcError for anything else."""
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"bad RPC endpoint {endpoint!r}: expected HOST:PORT, e.g. 192.168.1.20:50052")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    return host in ("localhost", "::1") or host.startswith("127.")


_abort_callback_c = None


def _on_ggml_abort(message: bytes) -> None:
    # llama.cpp aborts the process when an RPC server goes away mid-computation; it cannot be
    # recovered from in-process, but it can end with a clear message instead of a core dump.
    text = message.decode("utf-8", "replace")
    if "rpc" in text.lower():  # ggml-rpc.cpp's aborts (its path or its message name RPC)
        sys.stderr.write(
            "\nerror: an RPC server went away in the middle of a computation (llama.cpp: "
            f"{text.strip()}).\nllama.cpp's RPC client cannot recover from this inside the process: restart the "
            "command once the server is back (this conversation is lost).\n"
        )
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.write(text + "\n")  # anything else: what ggml's default would print, then its abort
    try:
        _ggml().ggml_print_backtrace()
    except Exception:
        pass


def _install_rpc_abort_handler() -> None:
    global _abort_callback_c
    if _abort_callback_c is None:
        lib = _ggml()
        callback_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
        _abort_callback_c = callback_type(_on_ggml_abort)  # kept: C holds it
        lib.ggml_set_abort_callback.argtypes = [callback_type]
        lib.ggml_set_abort_callback.restype = ctypes.c_void_p
        lib.ggml_set_abort_callback(_abort_callback_c)


def connect_rpc(endpoints) -> list[int]:
    """Register llama.cpp RPC servers (once per process) and return their devices. Each server is
    first reached with a plain TCP connection and a timeout, so an unreachable or refusing server
    is a clear error naming it, never a hang or an abort inside llama.cpp."""
    devices = []
    for endpoint in endpoints:
        endpoint = endpoint.strip()
        if endpoint in _rpc_devices:
            devices += _rpc_devices[endpoint]
            continue
        host, port = parse_endpoint(endpoint)
        try:
            with socket.create_connection((host, port), timeout=RPC_CONNECT_TIMEOUT):
                pass
        except OSError as e:
            reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
            raise RpcError(f"cannot reach the RPC server at {endpoint}: {reason} (is `cospec-local rpc-server` "
                           "running there, and the port open?)") from None
        add_server = _rpc_proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
        _install_rpc_abort_handler()
        reg = add_server(endpoint.encode())
        if not reg:
            raise RpcError(f"the RPC server at {endpoint} reports no devices")
        lib = _ggml()
        lib.ggml_backend_register(reg)
        found = [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
        _rpc_devices[endpoint] = found
        devices += found
    return devices


def local_offload_devices() -> list[int]:
    """This machine's own offload devices (GPUs): every registered non-CPU device that is not an
    RPC server's."""
    lib = _ggml()
    remote = {d for found in _rpc_devices.values() for d in found}
    kinds = {}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if dev not in remote:
            kinds.setdefault(lib.ggml_backend_dev_type(dev), []).append(dev)
    # As llama.cpp chooses: GPUs, else integrated GPUs; never CPU or accelerator devices (BLAS...).
    return kinds.get(_GGML_DEVICE_TYPE_GPU) or kinds.get(_GGML_DEVICE_TYPE_IGPU) or []


def start_rpc_server(host: str, port: int, n_threads: int) -> None:
    """Serve this machine's devices (its GPUs, else its CPU) to llama.cpp RPC clients; blocks for
    good (run it on a thread)."""
    start = _rpc_proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                      ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    lib = _ggml()
    devices = local_offload_devices() or [lib.ggml_backend_dev_by_type(_GGML_DEVICE_TYPE_CPU)]
    array = (ctypes.c_void_p * len(devices))(*devices)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    start(endpoint.encode(), None, n_threads, len(devices), array)
