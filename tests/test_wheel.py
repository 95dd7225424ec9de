"""The built wheel installs one import namespace, cospec_local, and its console script works from it."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "models" / "family"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project's wheel, built without network, installed into a fresh virtual environment whose
    dependencies come from this one (a .pth line: no second download of torch or llama.cpp)."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
                   check=True, cwd=tmp, timeout=300)
    wheel = next(dist.glob("cospec_local-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies from this environment, placed AFTER the fresh site-packages on sys.path.
    Path(site, "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, timeout=300)
    return wheel, venv, Path(site)


def test_the_wheel_holds_only_the_cospec_local_namespace(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"cospec_local"}
    assert "cospec_local/cli/main.py" in names and "cospec_local/data/cospec_policy.onnx" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cospec-local = cospec_local.cli.main:cli" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_installed_package_imports_from_the_venv_and_has_no_cli_or_models(installed, tmp_path):
    _, venv, site = installed
    python = venv / "bin" / "python"
    probe = ("import importlib.util, json, cospec_local; print(json.dumps({'file': cospec_local.__file__, "
             "'cli': importlib.util.find_spec('cli') is not None, 'models': importlib.util.find_spec('models') is not None}))")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    found = json.loads(out)
    assert found["file"].startswith(str(site))
    assert not found["cli"] and not found["models"]
    assert not (site / "cli").exists() and not (site / "models").exists()


def test_the_console_script_generates_from_the_installed_wheel(installed, tmp_path):
    """`cospec-local generate` run from outside the repository equals the repository's own run."""
    _, venv, _ = installed
    args = ["generate", "add 12 34", "--target", str(FAMILY / "target.gguf"), "--draft", str(FAMILY / "draft.gguf"),
            "--ctx-size", "512", "--threads", "1", "--temperature", "0", "--max-tokens", "24", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    installed_run = subprocess.run([venv / "bin" / "cospec-local", *args], capture_output=True, text=True, cwd=tmp_path,
                                   env=env, timeout=120)
    assert installed_run.returncode == 0, installed_run.stderr
    repo_run = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert json.loads(installed_run.stdout)["text"] == json.loads(repo_run.stdout)["text"]
    chat = subprocess.run([venv / "bin" / "cospec-local", "chat", *args[2:-1]], input="add 1 2\n", capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert chat.returncode == 0, chat.stderr


def test_the_installed_rpc_server_serves_the_installed_client(installed, tmp_path):
    """`cospec-local rpc-server` from the wheel lends its CPU to `cospec-local generate --rpc` from the
    wheel, and the offloaded target decodes as the local one."""
    import socket

    from server_load import wait_for_port

    _, venv, _ = installed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen([venv / "bin" / "cospec-local", "rpc-server", "--port", str(port), "--threads", "1"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        args = ["generate", "add 12 34", "--target", str(FAMILY / "target.gguf"), "--mode", "target", "--ctx-size", "512",
                "--threads", "1", "--temperature", "0", "--max-tokens", "24", "--json"]
        remote = subprocess.run([venv / "bin" / "cospec-local", *args, "--rpc", f"127.0.0.1:{port}", "--target-ngl", "99"],
                                capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert remote.returncode == 0, remote.stderr
        local = subprocess.run([venv / "bin" / "cospec-local", *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                               timeout=120)
        assert json.loads(remote.stdout)["text"] == json.loads(local.stdout)["text"]
    finally:
        server.terminate()
        server.wait(30)
