"""A `vllm serve` process on 127.0.0.1, owned by whoever started it: the demo, tests, benchmarks.

The server is started through `vispec-vllm serve` (so it works on both vLLM builds), waited for
on `/health` within a bounded time, and stopped by its own PID (SIGTERM to its process group,
then SIGKILL), so nothing it spawned outlives it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def http_json(url: str, payload: dict | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    """POST `payload` (or GET when None); returns (status, decoded body), 4xx/5xx included."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body)
        except json.JSONDecodeError:
            return err.code, {"raw": body.decode(errors="replace")}


# A sample line of the Prometheus text format: `name{label="value",...} value [timestamp]`. Label
# values are quoted and may hold escaped quotes and braces.
_LABELS = r'(?:\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?'
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")


def metric_samples(metrics_text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called `name` in a Prometheus text exposition (vLLM's `/metrics`), with its
    labels. `name` is the sample's exported name: vLLM's counter `vllm:spec_decode_num_drafts` is
    exported as `vllm:spec_decode_num_drafts_total` (and `..._created`, a different sample).

    A regular expression over the lines that start with `name`, not prometheus_client's parser,
    which builds every family of the page: the serve benchmark samples `/metrics` ten times a
    second beside the servers it measures."""
    pattern = re.compile(rf"^{re.escape(name)}{_LABELS}[ \t]+(\S+)", re.MULTILINE)
    return [({key: _label_value(escaped) for key, escaped in _LABEL.findall(labels)}, float(value))
            for labels, value in pattern.findall(metrics_text)]


def _label_value(escaped: str) -> str:
    """A label value as the text format writes it (backslash escapes `\\`, `\"` and `\n`), unescaped."""
    return _ESCAPE.sub(lambda match: "\n" if match[1] == "n" else match[1], escaped)


def metric_total(metrics_text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (so summed over the
    others, such as vLLM's engine index); 0.0 when there is none."""
    return sum(value for sample_labels, value in metric_samples(metrics_text, name)
               if all(sample_labels.get(key) == wanted for key, wanted in labels.items()))


class VLLMServer:
    """`with VLLMServer(target, [...extra serve args]) as server: server.chat(...)`."""

    def __init__(
        self,
        model: str | Path,
        serve_args: list[str] | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 240.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model = str(model)
        self.serve_args = list(serve_args or [])
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        return self.launch().wait_until_healthy()

    def launch(self) -> VLLMServer:
        """Start the process without waiting (several servers can then start side by side)."""
        cmd = [sys.executable, "-m", "vispec_vllm.cli", "serve", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.serve_args]
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        # Own process group: stop() reaches the engine-core and worker children too.
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        self._launched_at = time.monotonic()
        return self

    def wait_until_healthy(self) -> VLLMServer:
        deadline = self._launched_at + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode} during start-up"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            try:
                if http_json(self.base_url + "/health", timeout=2)[0] == 200:
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout_s:.0f} s")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=10)
        try:  # children that ignored SIGTERM
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def chat(self, content: list[dict] | str, max_tokens: int = 32, **fields) -> tuple[int, dict]:
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": max_tokens, "temperature": 0.0, **fields}
        return http_json(self.base_url + "/v1/chat/completions", payload)

    def chat_stream(self, content: list[dict] | str, max_tokens: int = 32, **fields) -> tuple[int, str]:
        """Streamed chat completion: (HTTP status, concatenated content or the error body)."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": max_tokens, "temperature": 0.0, "stream": True, **fields}
        req = urllib.request.Request(self.base_url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                text = []
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        return 500, json.dumps(chunk["error"])
                    for choice in chunk.get("choices", []):
                        text.append(choice.get("delta", {}).get("content") or "")
                return resp.status, "".join(text)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def abandon_stream(self, content: list[dict] | str, max_tokens: int = 64) -> int:
        """Start a streamed chat completion and disconnect after its first chunk (a client that
        goes away mid-stream). Returns the HTTP status seen before disconnecting."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        req = urllib.request.Request(self.base_url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.readline()
            return resp.status

    def process_tree_rss_bytes(self) -> int:
        """Resident memory of the server and every process it started (engine core, workers)."""
        import psutil

        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as resp:
            return resp.read().decode()


def start_side_by_side(stack, setups: dict[str, tuple[list[str], dict[str, str]]], model: str | Path,
                       log_dir: Path, log_prefix: str = "", startup_timeout_s: float = 600.0) -> dict[str, VLLMServer]:
    """`vllm serve` processes, one per set-up name -> (extra serve args, extra environment),
    launched side by side (an idle server costs nothing) and then waited for; `stack` (a
    contextlib.ExitStack) stops each one by its own PID when it closes."""
    servers = {}
    for name, (serve_args, env) in setups.items():
        server = VLLMServer(model, serve_args, log_path=Path(log_dir) / f"{log_prefix}{name}.log",
                            startup_timeout_s=startup_timeout_s, env=env)
        stack.callback(server.stop)
        servers[name] = server.launch()
    for server in servers.values():
        server.wait_until_healthy()
    return servers

