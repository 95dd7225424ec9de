"""Start `cospec-local serve` in a subprocess, and drive it with the official `openai` client.

Used by tests/test_server.py, and runnable as the server's load benchmark:

    .venv/bin/python tests/server_load.py [--pair family|default] [--requests 32] [--max-tokens 64]

which serves the pair with --parallel 1 and then 4, sends the same concurrent streaming chat
requests to each, and prints requests, wall time, aggregate tokens/s, the longest queue wait and
the server's resident memory.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import tempfile
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "models" / "family"
FAMILY_MODELS = ["--draft", str(FAMILY / "draft.gguf"), "--target", str(FAMILY / "target.gguf")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until something listens on loopback `port`; fail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server process exited with {proc.returncode} before listening on {port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listened on port {port} within {timeout:.0f} s")
            time.sleep(0.2)


class ServerProcess:
    """A `cospec-local serve` subprocess on a free loopback port."""

    def __init__(self, *args: str, startup_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cli.main", "serve", *map(str, args), "--port", str(self.port)]
        # A file, not a pipe: a pipe nobody reads would block the server once full.
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not come up in time")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mib(self) -> float:
        """The server's resident memory (VmRSS), MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, parsed JSON or text) of one raw HTTP request."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, raw = resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read().decode()
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw

    def get(self, path: str, headers: dict | None = None):
        return self.request("GET", path, None, headers)

    def post(self, path: str, payload, headers: dict | None = None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{labels}': value}, read with prometheus_client's parser."""
        from prometheus_client.parser import text_string_to_metric_families

        req = urllib.request.Request(self.url + "/metrics")
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return out

    def abandon(self, path: str, payload: dict, after: float) -> None:
        """Send a request on a raw socket, wait `after` seconds, and hang up without reading."""
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(head + body)
            time.sleep(after)

    def stop(self) -> str:
        """Ctrl-C the server, wait for it, and return what it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output()

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def client(server: ServerProcess, api_key: str = "unused", asynchronous: bool = False):
    import openai

    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


async def _stream_chat(aclient, messages, **params) -> tuple[str, int]:
    """The streamed reply text and its completion token count (from the final chunk's usage)."""
    stream = await aclient.chat.completions.create(messages=messages, stream=True, model="m", **params)
    parts, n_tokens = [], 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if getattr(chunk, "usage", None):
            n_tokens = chunk.usage.completion_tokens
    return "".join(parts), n_tokens


def stream_chats(server: ServerProcess, conversations: list[list[dict]], concurrent: bool, **params) -> dict:
    """Send every conversation as a streaming chat request, all at once or one after another.
    Returns texts (in order), completion tokens, wall seconds and aggregate tokens/s."""

    async def main():
        aclient = client(server, asynchronous=True)
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*[_stream_chat(aclient, m, **params) for m in conversations])
        else:
            results = [await _stream_chat(aclient, m, **params) for m in conversations]
        wall = time.perf_counter() - t0
        await aclient.close()
        return results, wall

    results, wall = asyncio.run(main())
    n_tokens = sum(n for _, n in results)
    return {"texts": [t for t, _ in results], "tokens": n_tokens, "wall": wall, "tokens_per_second": n_tokens / wall}


def task_conversations(n: int) -> list[list[dict]]:
    """n single-turn chats: held-out test-world problems, alternating families."""
    from cospec_local.lab.testworld.tasks import problems

    half = (n + 1) // 2
    prompts = [p.prompt for pair in zip(problems("add", "eval", half), problems("count", "eval", half)) for p in pair][:n]
    return [[{"role": "user", "content": prompt}] for prompt in prompts]


def _load_figures(pair: str, n_requests: int, max_tokens: int, ctx_size: int) -> None:
    models = FAMILY_MODELS if pair == "family" else []
    conversations = task_conversations(n_requests) if pair == "family" else [
        [{"role": "user", "content": q}] for q in
        [f"Tell me one fact about the number {i}." for i in range(n_requests)]]
    params = dict(temperature=0, max_tokens=max_tokens)
    print(f"pair={pair} requests={n_requests} max_tokens={max_tokens} ctx={ctx_size} (streaming chat, temperature 0)")
    for parallel in (1, 4):
        with ServerProcess(*models, "--ctx-size", str(ctx_size), "--parallel", str(parallel)) as server:
            stream_chats(server, conversations[:parallel], concurrent=True, **params)  # warm every slot
            run = stream_chats(server, conversations, concurrent=True, **params)
            m = server.metrics()
            print(f"  P={parallel}: {n_requests} requests, wall {run['wall']:.2f} s, {run['tokens']} tokens, "
                  f"aggregate {run['tokens_per_second']:.1f} tok/s, longest queue wait "
                  f"{m['cospec_queue_wait_max_seconds']:.2f} s, RSS {server.rss_mib():.0f} MiB")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=["family", "default"], default="family")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx-size", type=int, default=1024)
    a = ap.parse_args()
    _load_figures(a.pair, a.requests, a.max_tokens, a.ctx_size)
