"""How the installed llama.cpp was built (its system-info string), whether this CPU can run it,
and how many threads it gets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from ._lib import _init_backend

# ggml's CPU feature names (its system-info string) -> the /proc/cpuinfo flag that says the CPU has
# it. A build that uses a feature the CPU lacks dies with SIGILL on its first matrix product.
_CPUINFO_FLAG = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "asimd", "ARM_FMA": "asimd", "FP16_VA": "asimdhp", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm",
    "SVE": "sve", "SME": "sme", "SME2": "sme2",
}
KERNELS = ("exact", "fast")


@dataclass(frozen=True)
class BuildInfo:
    """How the installed llama.cpp was built, read from its system-info string."""

    system_info: str  # llama.cpp's own line, e.g. 'CPU : SSE3 = 1 | AVX = 1 | ... | REPACK = 1 |'
    backends: dict  # backend name -> {feature: value}

    @property
    def cpu_features(self) -> frozenset[str]:
        """Instruction-set features the CPU backend was compiled for (AVX2, AVX512, NEON...)."""
        cpu = self.backends.get("CPU", {})
        return frozenset(k for k, v in cpu.items() if k in _CPUINFO_FLAG and v == "1")

    @property
    def llamafile(self) -> bool:
        """llamafile's sgemm is compiled in: batched matrix products then round differently from
        single-token ones, so no setting makes verification rows bit-identical."""
        return self.backends.get("CPU", {}).get("LLAMAFILE") == "1"

    def guarantee(self, kernels: str, offloaded: bool) -> str:
        """What greedy output promises with these `kernels` on this build: one line for `info` and
        `bench`."""
        if kernels == "exact" and not self.llamafile and not offloaded:
            return "bit-exact: every verified row equals target-only decoding, greedy output is token-for-token target-only's"
        why = ("fast kernels (flash attention, repacked weights, large batches)" if kernels == "fast"
               else "llamafile's sgemm is compiled into this llama.cpp" if self.llamafile
               else "GPU kernels")
        return (f"near-exact ({why}): batched rows differ from single-token rows in the last bits, so greedy "
                "output equals target-only's except at near-ties, as in llama.cpp itself")


def build_info() -> BuildInfo:
    """Read how the installed llama.cpp was built (its system-info string)."""
    import llama_cpp

    _init_backend(None)
    text = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    backends: dict[str, dict[str, str]] = {}
    current = None
    for part in text.split("|"):
        if " : " in part:  # 'CPU : SSE3 = 1' starts a backend's section
            current, part = (x.strip() for x in part.split(" : ", 1))
            backends.setdefault(current, {})
        if current is not None and "=" in part:
            key, value = (x.strip() for x in part.split("=", 1))
            backends[current][key] = value
    return BuildInfo(text.strip(), backends)


def machine_cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as Linux reports them (/proc/cpuinfo), or None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return None


def missing_cpu_features(info: BuildInfo | None = None) -> list[str]:
    """Features the installed llama.cpp was compiled for that this CPU lacks ([] when none, or
    when the CPU cannot be read). Non-empty means the build will crash here (SIGILL)."""
    flags = machine_cpu_flags()
    if flags is None:
        return []
    info = info or build_info()
    return sorted(f for f in info.cpu_features if _CPUINFO_FLAG[f] not in flags)


def check_build_fits_cpu() -> None:
    """Raise ModelLoadError when the installed llama.cpp uses instructions this CPU lacks, instead
    of dying with 'Illegal instruction' in the first matrix product (once per process)."""
    global _build_checked
    if _build_checked:
        return
    missing = missing_cpu_features()
    if missing:
        raise ModelLoadError(
            f"the installed llama-cpp-python was built for CPU features this machine lacks ({', '.join(missing)}) "
            "and would crash with 'Illegal instruction': rebuild it here with `make llama-cpp` (the Makefile "
            "builds for this CPU), or pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python"
        )
    _build_checked = True


_build_checked = False


def default_threads() -> int:
    """Threads for llama.cpp: all cores on small machines, half the logical CPUs on big ones (SMT)."""
    n = os.cpu_count() or 1
    return n if n <= 4 else max(4, n // 2)
