"""Targets over llama.cpp's RPC backend: `cospec-local rpc-server` on a free loopback port, the
test-world target offloaded to it, and the errors for endpoints that cannot be used."""

import json
import socket
import subprocess
import sys
import time

import pytest

from server_load import FAMILY_MODELS, ROOT, free_port, wait_for_port

PROMPT = "add 12 34"


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def generate(mode: str, *extra) -> str:
    out = cli("generate", PROMPT, *FAMILY_MODELS, "--ctx-size", 512, "--threads", 1, "--mode", mode, "--temperature", 0,
              "--max-tokens", 40, "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["text"]


@pytest.fixture(scope="module")
def rpc_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "rpc-server", "--port", str(port), "--threads", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
    except RuntimeError:
        proc.kill()
        raise
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


@pytest.mark.parametrize("mode", ["target", "spec"])
def test_a_target_offloaded_over_rpc_decodes_as_the_local_one(rpc_server, mode):
    local = generate(mode)
    remote = generate(mode, "--rpc", rpc_server, "--target-ngl", 99, "--verbose")
    assert remote == local


def test_the_offload_really_goes_to_the_rpc_server(rpc_server):
    """llama.cpp's log of the offloaded run names the RPC device holding the target's layers."""
    out = cli("generate", PROMPT, *FAMILY_MODELS, "--ctx-size", 512, "--threads", 1, "--mode", "target", "--temperature", 0,
              "--max-tokens", 5, "--rpc", rpc_server, "--target-ngl", 99, "--verbose")
    assert out.returncode == 0, out.stderr
    assert "assigned to device RPC0" in out.stderr and "offloaded 5/5 layers" in out.stderr


def test_an_unreachable_rpc_server_is_a_clear_error_in_bounded_time():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    out = cli("generate", PROMPT, *FAMILY_MODELS, "--rpc", f"127.0.0.1:{port}", "--target-ngl", 99, timeout=60)
    assert time.monotonic() - t0 < 30
    assert out.returncode == 1
    assert f"cannot reach the RPC server at 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
    bad = cli("generate", PROMPT, *FAMILY_MODELS, "--rpc", "nowhere", timeout=60)
    assert bad.returncode == 1 and "bad RPC endpoint 'nowhere'" in bad.stderr


def test_rpc_server_warns_when_bound_beyond_loopback():
    """Bound to 0.0.0.0 it warns that RPC has no authentication (the port is one we hold, so the
    server cannot actually listen and nothing is exposed)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "rpc-server", "--host", "0.0.0.0", "--port", str(port)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    assert "no authentication" in err
    assert proc.returncode == 1 and f"cannot listen on 0.0.0.0:{port}" in err  # not a silent "listening"


def test_rpc_server_refuses_addresses_llama_cpp_cannot_bind():
    out = cli("rpc-server", "--host", "::1", "--port", free_port(), timeout=60)
    assert out.returncode != 0 and "IPv4 addresses only" in out.stderr


@pytest.mark.slow
def test_a_server_that_goes_away_mid_generation_ends_the_command_with_a_clear_error(default_pair_paths):
    """llama.cpp's RPC client aborts the process when its server disappears mid-computation; the
    command must end promptly with exit status 1 and a message saying what happened (not a core
    dump), after streaming what it had generated."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "rpc-server", "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        client = subprocess.Popen([sys.executable, "-m", "cli.main", "generate", "The history of the Roman Empire", "--mode",
                                   "target", "--max-tokens", "900", "--temperature", "0", "--rpc", f"127.0.0.1:{port}",
                                   "--target-ngl", "99"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = client.stdout.read(20)  # generation under way
        assert first
        server.kill()
        out, err = client.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    assert client.returncode == 1
    assert "an RPC server went away in the middle of a computation" in err and "restart the command" in err
