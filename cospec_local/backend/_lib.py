"""llama.cpp's process-wide state: one initialisation per process, our filter on its log, and
libggml's device registry through ctypes (llama-cpp-python binds only llama.h)."""

from __future__ import annotations

import ctypes
import sys

_backend_ready = False
_log_verbose = False
_log_last_shown = False
# ggml's log levels in the llama.cpp this package is built on: DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5.
_GGML_LOG_ERROR = 4
_GGML_LOG_CONT = 5


def _log_callback(level, text, user_data):
    # Show llama.cpp's errors always, its chatter only with verbose=True; CONT lines follow their head.
    global _log_last_shown
    show = _log_last_shown if level == _GGML_LOG_CONT else (_log_verbose or level >= _GGML_LOG_ERROR)
    _log_last_shown = show
    if show:
        sys.stderr.write(text.decode("utf-8", "replace"))


_log_callback_c = None


def _init_backend(verbose: bool | None) -> None:
    """Initialise llama.cpp once per process and install our log filter (`verbose`: show its log;
    None keeps the current setting)."""
    global _backend_ready, _log_verbose, _log_callback_c
    import llama_cpp

    if verbose is not None:
        _log_verbose = verbose
    if not _backend_ready:
        _log_callback_c = llama_cpp.llama_log_callback(_log_callback)  # keep a reference: C holds it
        llama_cpp.llama_log_set(_log_callback_c, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


_ggml_lib = None


def _ggml():
    """libggml's device registry through ctypes (llama-cpp-python binds only llama.h)."""
    global _ggml_lib
    if _ggml_lib is None:
        from llama_cpp._ggml import libggml as lib

        sigs = {
            "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
            "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
            "ggml_backend_register": ([ctypes.c_void_p], None),
            "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
            "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
            "ggml_backend_dev_count": ([], ctypes.c_size_t),
            "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
            "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
            "ggml_backend_dev_by_type": ([ctypes.c_int], ctypes.c_void_p),
            "ggml_print_backtrace": ([], None),
        }
        for name, (args, res) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _ggml_lib = lib
    return _ggml_lib
