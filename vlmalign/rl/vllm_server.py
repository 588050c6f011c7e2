"""`vlmalign vllm-serve`: one vLLM engine shared by every training process, and the trainer's client for it.

A small HTTP server (standard library) around `VLLMEngine`, bound to 127.0.0.1 unless told otherwise:

* ``GET /health`` -> ``{"status": "ok", "model_type", "logprobs_mode", "model"}``;
* ``POST /generate`` with ``{"requests": [{"prompt": text, "images": [base64 PNG, ...]}], "params": [SamplingParams
  kwargs, ...]}`` -> ``{"results": [{"prompt_token_ids", "token_ids", "logprobs"}, ...]}``;
* ``POST /update_weights`` with a safetensors blob of the policy's weights (vLLM's names) -> loads them and resets
  the engine's caches.

Requests are served one at a time (a lock around the engine). Weights travel as one safetensors blob over HTTP:
fine for small models and single machines; a 7B model moves ~15 GB per update this way (TRL's server uses an NCCL
group instead, which this server does not implement).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)


def _image_to_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_from_b64(data: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


# ------------------------------------------------------------------------------------------------------ client


class VLLMClient:
    """The trainer's side: same `generate` / `load_weights` as `VLLMEngine`, over HTTP."""

    def __init__(self, url: str, timeout: float = 240.0, request_timeout: float = 3600.0):
        self.url, self.timeout, self.request_timeout = url.rstrip("/"), timeout, request_timeout

    def _call(self, path: str, data: bytes | None = None, content_type: str = "application/json",
              timeout: float | None = None) -> dict:
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.request_timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:2000]
            raise RuntimeError(f"vLLM server {self.url}{path} answered {error.code}: {detail}") from None

    def wait_until_up(self) -> dict:
        """Poll /health until the server answers, or raise after `timeout` seconds naming what to do."""
        deadline = time.monotonic() + self.timeout
        last = None
        while True:
            try:
                return self._call("/health", timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                last = error
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no vLLM server answered at {self.url} within {self.timeout:.0f} s (vllm_server_timeout); last "
                    f"error: {last}. Start one with `vlmalign vllm-serve --model <the policy's starting checkpoint> "
                    "--port <vllm_server_port>` (wait for 'serving on'), or use vllm_mode='colocate'.")
            time.sleep(1.0)

    def generate(self, requests: list[dict], params: list[dict]) -> list[dict]:
        body = {"requests": [{"prompt": r["prompt"], "images": [_image_to_b64(im) for im in r.get("images") or []]}
                             for r in requests], "params": params}
        return self._call("/generate", json.dumps(body).encode("utf-8"))["results"]

    def load_weights(self, weights) -> None:
        from safetensors.torch import save

        blob = save({name: tensor.detach().contiguous().cpu() for name, tensor in weights})
        self._call("/update_weights", blob, content_type="application/octet-stream")


# ------------------------------------------------------------------------------------------------------ server


def _handler(engine, info: dict, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - quiet: one line per request is logged below
            logger.debug(format, *args)

        def _reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._reply(200, {"status": "ok", **info})
            else:
                self._reply(404, {"error": f"unknown path {self.path}"})

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            try:
                if self.path == "/generate":
                    payload = json.loads(body)
                    requests = [{"prompt": r["prompt"], "images": [_image_from_b64(x) for x in r.get("images", [])]}
                                for r in payload["requests"]]
                    params = []
                    for p in payload["params"]:
                        p = dict(p)
                        if p.get("logit_bias"):
                            p["logit_bias"] = {int(k): float(v) for k, v in p["logit_bias"].items()}
                        params.append(p)
                    with lock:
                        results = engine.generate(requests, params)
                    self._reply(200, {"results": results})
                elif self.path == "/update_weights":
                    from safetensors.torch import load

                    start = time.monotonic()
                    tensors = load(body)
                    with lock:
                        engine.load_weights(tensors.items())
                    self._reply(200, {"status": "ok", "tensors": len(tensors),
                                      "seconds": round(time.monotonic() - start, 3)})
                else:
                    self._reply(404, {"error": f"unknown path {self.path}"})
            except Exception as error:  # the trainer gets the reason, the server keeps serving
                logger.exception("request %s failed", self.path)
                self._reply(500, {"error": f"{type(error).__name__}: {error}"})

    return Handler


def build_server_engine(model: str, settings_kwargs: dict):
    """The engine for `model` (a saved folder): family checks, weights renamed for vLLM where the family needs it."""
    from transformers import AutoConfig

    from ..models.families import get_family
    from ..models.loading import load_processor
    from .vllm_engine import EngineSettings, VLLMEngine, require_vllm, rewrite_checkpoint_folder, vllm_unsupported

    require_vllm()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    config = AutoConfig.from_pretrained(model)
    family = get_family(config)
    reason = vllm_unsupported(config, load_processor(model).tokenizer)
    if reason:
        raise SystemExit(f"vlmalign vllm-serve: {reason}")
    folder = model
    if family.vllm_weight_renames:
        import atexit
        import shutil

        folder = tempfile.mkdtemp(prefix="vlmalign-vllm-serve-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        rewrite_checkpoint_folder(model, folder, family)
    engine = VLLMEngine(folder, family, EngineSettings(**settings_kwargs))
    return engine, {"model_type": config.model_type, "logprobs_mode": engine.settings.logprobs_mode, "model": model}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vlmalign vllm-serve", description="Serve a model with vLLM for GRPO/GSPO "
                                "training with use_vllm=True, vllm_mode='server'.")
    p.add_argument("--model", required=True, help="saved model folder (the policy's starting checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-images", type=int, default=1, help="most images in one prompt")
    p.add_argument("--logprobs-mode", default="raw_logprobs", choices=["raw_logprobs", "processed_logprobs"],
                   help="raw for temperature 1 without top-k/top-p/min-p, processed otherwise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--engine-kwargs", type=json.loads, default=None, help="extra vllm.LLM kwargs as JSON")
    a = p.parse_args(argv)
    engine, info = build_server_engine(a.model, dict(
        dtype=a.dtype, max_model_len=a.max_model_len, max_images=a.max_images, seed=a.seed,
        logprobs_mode=a.logprobs_mode, gpu_memory_utilization=a.gpu_memory_utilization,
        tensor_parallel_size=a.tensor_parallel_size, extra=a.engine_kwargs))
    server = ThreadingHTTPServer((a.host, a.port), _handler(engine, info, threading.Lock()))
    import signal

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)                      # terminate: clean exit (temporary folders removed)
    print(f"vlmalign vllm-serve: serving on http://{a.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
