"""How llama.cpp is built and which kernels run: the default build uses only what this CPU has,
the wheel cache key follows the CPU, and the exact/fast kernel choice is reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cospec_local.backend import BuildInfo, LlamaModel, LoadOptions, build_info, machine_cpu_flags, missing_cpu_features

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = "fpu sse4_2 avx avx2 fma f16c bmi2"  # e.g. AMD Zen 3, Intel 12th gen and later
AVX512 = AVX2_ONLY + " avx512f avx512cd avx512vl avx512dq avx512bw avx512_vnni avx512vbmi"
AVX512_AMX = AVX512 + " avx512_bf16 amx_tile amx_int8 amx_bf16"  # e.g. Sapphire Rapids


def test_the_installed_llama_cpp_uses_no_cpu_feature_this_machine_lacks():
    """Every instruction-set feature in llama.cpp's system-info string is one /proc/cpuinfo lists:
    a build for another CPU dies here with 'Illegal instruction' in its first matrix product."""
    info = build_info()
    assert info.system_info.startswith("CPU :") and info.cpu_features, info.system_info
    flags = machine_cpu_flags()
    assert flags is not None, "this test reads /proc/cpuinfo (Linux)"
    assert missing_cpu_features(info) == [], f"built for {sorted(info.cpu_features)}, this CPU: {sorted(flags)}"


def test_the_feature_check_fails_for_a_build_this_cpu_cannot_run(monkeypatch):
    """The check above can fail: a build with AVX-512 and AMX on a CPU with AVX2 only."""
    import cospec_local.backend.build as backend_build

    monkeypatch.setattr(backend_build, "machine_cpu_flags", lambda: frozenset(AVX2_ONLY.split()))
    fake = BuildInfo("CPU : AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 |",
                     {"CPU": {"AVX": "1", "AVX2": "1", "AVX512": "1", "AMX_INT8": "1"}})
    assert missing_cpu_features(fake) == ["AMX_INT8", "AVX512"]


def make_print_build(cpu_flags: str | None = None, **env) -> dict[str, str]:
    args = ["make", "-s", "print-build"] + ([f"CPU_FLAGS={cpu_flags}"] if cpu_flags is not None else [])
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HOME": "/tmp", **env})
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


def test_the_makefile_enables_exactly_what_each_cpu_has():
    """x86-64 Linux: AVX2 only gives no AVX-512; AVX-512 its extensions as listed; AMX always off
    (llama.cpp's AMX kernels crashed). Elsewhere (aarch64, macOS): llama.cpp's native build.
    llamafile is always off (exactness) and RPC on."""
    uname = subprocess.run(["uname", "-sm"], capture_output=True, text=True).stdout.split()
    if uname != ["Linux", "x86_64"]:
        assert make_print_build()["CMAKE_ARGS"] == "-DGGML_LLAMAFILE=OFF -DGGML_RPC=ON"
        return
    avx2 = make_print_build(AVX2_ONLY)["CMAKE_ARGS"].split()
    assert "-DGGML_AVX2=ON" in avx2 and "-DGGML_AVX512=OFF" in avx2 and "-DGGML_AVX512_VNNI=OFF" in avx2
    avx512 = make_print_build(AVX512)["CMAKE_ARGS"].split()
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_BF16=OFF"} <= set(avx512)
    amx = make_print_build(AVX512_AMX)["CMAKE_ARGS"].split()
    assert {"-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(amx)
    for args in (avx2, avx512, amx):
        assert "-DGGML_NATIVE=OFF" in args and "-DGGML_LLAMAFILE=OFF" in args and "-DGGML_RPC=ON" in args
    # This machine's own flags give a build that uses none of what it lacks.
    here = make_print_build()["CMAKE_ARGS"].split()
    flags = machine_cpu_flags()
    assert ("-DGGML_AVX512=ON" in here) == ("avx512f" in flags)
    assert ("-DGGML_AVX2=ON" in here) == ("avx2" in flags)


def test_the_wheel_cache_key_follows_the_cpu_and_the_flags():
    """Two CPUs sharing a home directory never share a wheel, even with the same CMAKE_ARGS."""
    keys = {make_print_build(f)["WHEEL_KEY"] for f in (AVX2_ONLY, AVX512, AVX512_AMX)}
    assert len(keys) == 3 and all(len(k) == 16 and int(k, 16) >= 0 for k in keys)
    mine = make_print_build(AVX2_ONLY, CMAKE_ARGS="-DGGML_CUDA=on")
    other = make_print_build(AVX2_ONLY + " sha_ni", CMAKE_ARGS="-DGGML_CUDA=on")
    assert mine["CMAKE_ARGS"] == "-DGGML_CUDA=on"  # the user's own CMAKE_ARGS win
    assert mine["WHEEL_KEY"] != other["WHEEL_KEY"]  # a native build is specific to its CPU


def test_exact_kernels_are_the_default_and_what_this_build_guarantees(tiny_target):
    info = build_info()
    assert LoadOptions().kernels == "exact"
    assert info.guarantee("exact", offloaded=False).startswith("bit-exact") == (not info.llamafile)
    assert info.guarantee("fast", offloaded=False).startswith("near-exact")
    assert info.guarantee("exact", offloaded=True).startswith("near-exact")


def test_fast_kernels_load_and_decode_with_full_batches(tiny_target):
    """Fast kernels: repacked weights, flash attention, verification batches not capped at 7."""
    with LlamaModel(tiny_target, LoadOptions(n_ctx=256, n_threads=1, kernels="fast")) as fast, \
            LlamaModel(tiny_target, LoadOptions(n_ctx=256, n_threads=1)) as exact:
        assert exact.exact_batch == 7 and fast.exact_batch == fast.n_batch > 7
        tokens = fast.tokenize("hello world")
        a, b = fast.eval(tokens, 1)[0].copy(), exact.eval(tokens, 1)[0].copy()
        assert abs(a - b).max() < 1e-2  # the same model, up to rounding
    with pytest.raises(ValueError, match="unknown kernels"):
        LlamaModel(tiny_target, LoadOptions(kernels="turbo"))


def test_info_reports_the_build_and_the_kernels(tiny_target):
    for kernels, says in (("exact", "bit-exact"), ("fast", "near-exact")):
        out = subprocess.run([sys.executable, "-m", "cli.main", "info", "--target", str(tiny_target), "--ctx-size", "128",
                              "--kernels", kernels], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "llama.cpp build: CPU :" in out.stdout and f"kernels: {kernels}; {says}" in out.stdout
