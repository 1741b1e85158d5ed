"""`loracls serve RUN`: a finished run behind HTTP, speaking Text Embeddings Inference's protocol.

Not to be confused with loracls.onnx_inference, which is the ONNX Runtime *predictor* (texts in, probabilities out, in one
process).  This module puts any predictor (onnx-int8, onnx, fast, peft) behind an HTTP server, so that clients of
TEI (`POST /predict`) and huggingface_hub's `InferenceClient(base_url=...).text_classification` work unchanged:

    POST /predict   {"inputs": "text" | ["t1", ...] | [["a", "b"], ...], "truncate": true, "raw_scores": false}
                    -> one list of {"label", "score"} per input (every label, best first); a single string gets one
                    flat list, as TEI answers
    POST /          the same; a body carrying "parameters" (the HF Inference API's convention, which InferenceClient
                    sends) gets that API's shape: always one list per input, `top_k` honoured
    GET  /health    200 once the model is loaded (the server listens only then)
    GET  /info      model, labels, task, backend, limits, loracls version
    GET  /metrics   Prometheus text format

One difference from TEI: a top-level list of strings is a batch of texts (as the HF Inference API and pipeline()
read it); TEI reads `["a", "b"]` as one pair.  Pairs are always written as inner lists, `[["a", "b"], ...]`.

How a request is served: the event loop parses and validates it, tokenizes it in a tokenizer thread (the
predictor's own tokenization, so the ids are `loracls predict`'s), and queues its texts.  The queued texts are
taken in arrival order, up to `max_batch_tokens` tokens at a time (a batch; a large request is split over
batches), sorted by length and cut into model calls of `batch_size` texts, so that a call pads little.  Inference
threads (`workers`: one per core on ONNX, each call single-threaded; one on PyTorch) each run one call at a time,
and the next batch is taken as soon as the last call of this one has started, so no thread waits for another.
Each text's probabilities go back to its request as its call ends; the request is answered, in its order, once
all of them are in.  The event loop never waits on the model, and a request over `max_concurrent_requests` is
refused at once (429): the queue is bounded by that limit times `max_input_texts`.  The fp32 backends answer what
`loracls predict` does (within float rounding); onnx-int8 quantizes each call's activations with that call's own
range, so its scores move slightly with the texts a call holds, as `loracls predict --backend onnx-int8`'s move
with --batch-size.

starlette and uvicorn are the extra `loracls[serve]`, imported only here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from loracls.config import choices
from loracls.errors import LoraclsError, first_line
from loracls.predictor import INFERENCE_BACKENDS
from loracls.onnx_inference import ONNX_BACKENDS

log = logging.getLogger("loracls.server")

LOG_LEVELS = ("warning", "info", "debug")
# What `backend: auto` serves on a CPU when ONNX Runtime is installed: the fastest backend measured there (README,
# "Serving on a CPU").  On a GPU, and without onnxruntime, auto is the PyTorch auto (fast where it applies).
CPU_FASTEST = "onnx-int8"
# Texts per ONNX call.  A served batch mixes whatever arrived together, so its lengths vary far more than a sorted
# file's, and a call pads to its longest: on AG News, batches of 36 texts sorted by length run 97% more tokens than
# they hold in calls of 64, 18% in calls of 8, 7% in calls of 4.  Measured on MiniLM int8 (two single-threaded
# workers on 2 cores, 1,000 requests of 1-8 texts on 16 connections, mean of 2-7 runs): 272 texts/s with 1 a call,
# 312 with 2, 306 with 3, 308 with 4, 270 with 8; with 1 the calls' own cost takes over.
ONNX_CALL_TEXTS = 4


@dataclass
class ServerSettings:
    """How `loracls serve` listens, batches and limits.  The CLI flags are generated from these fields."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = 8080
    """TCP port (0: any free port, printed when ready)."""
    backend: str = field(default="auto", metadata=choices(INFERENCE_BACKENDS))
    """auto: the fastest available here (onnx-int8 on a CPU with loracls[onnx], else fast where it applies, else
    peft); or one of them by name."""
    max_batch_tokens: int = 16384
    """Most tokens (padding excluded) run in one batch; texts that arrive together share a batch up to it."""
    max_concurrent_requests: int = 512
    """Requests in flight at once; one more is refused with 429 at once."""
    max_input_texts: int = 32
    """Most texts in one request; more is refused with 413."""
    workers: int | None = None
    """Inference threads, each running one model call at a time (default: on onnx and onnx-int8, one per core, or
    per --threads, each call on one core; on fast and peft, one, whose calls PyTorch spreads over the cores)."""
    batch_size: int | None = None
    """Texts per model call inside a batch, which is sorted by length first, so that a call pads little (default:
    4 on onnx and onnx-int8, whose calls pad to their longest text; the run's eval_batch_size on fast and peft)."""
    payload_limit: int = 2_000_000
    """Largest request body in bytes; larger is refused with 413."""
    log_level: str = field(default="warning", metadata=choices(LOG_LEVELS))
    """info: one line per request (method, route, status, texts, ms)."""

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_concurrent_requests", "max_input_texts", "workers", "payload_limit",
                     "batch_size"):
            value = getattr(self, name)
            if name in ("workers", "batch_size") and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LoraclsError(f"{name} must be a positive whole number, got {value!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise LoraclsError(f"port must be a whole number from 0 to 65535, got {self.port!r}")
        for name in ("backend", "log_level"):
            allowed = next(f for f in dataclasses.fields(self) if f.name == name).metadata["choices"]
            if getattr(self, name) not in allowed:
                raise LoraclsError(f"unknown {name} {getattr(self, name)!r}; choose {', '.join(allowed)}")


def settings_from(options: dict) -> ServerSettings:
    """ServerSettings from keywords (the CLI's flags, or loracls.serve()'s), refusing unknown ones by name."""
    names = [f.name for f in dataclasses.fields(ServerSettings)]
    unknown = [k for k in options if k not in names]
    if unknown:
        raise LoraclsError(f"unknown server setting {unknown[0]!r}; the settings are {', '.join(names)}")
    return ServerSettings(**options)


def need_server_packages() -> None:
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("starlette", "uvicorn")):
        raise LoraclsError("loracls serve needs starlette and uvicorn; pip install 'loracls[serve]'")


def resolve_backend(backend: str, device: str) -> tuple[str, str]:
    """The backend to load and why: `auto` is onnx-int8 on a CPU that has ONNX Runtime, else PyTorch's auto."""
    if backend != "auto":
        return backend, "asked for"
    import importlib.util

    on_cpu = device == "cpu" or device == "auto" and not _cuda_visible()
    if not on_cpu:
        return "auto", "auto on a GPU: PyTorch"
    if all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime")):
        return CPU_FASTEST, "auto: the fastest on a CPU"
    return "auto", "auto without loracls[onnx]: PyTorch"


def _cuda_visible() -> bool:
    """Whether torch sees a GPU.  A machine without GPU device files is a CPU machine: no torch import there,
    so ONNX serving starts without it."""
    import glob
    import importlib.util
    import os

    if "torch" not in sys.modules and (importlib.util.find_spec("torch") is None
                                       or os.environ.get("CUDA_VISIBLE_DEVICES") == ""
                                       or not glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd")):
        return False
    import torch

    return torch.cuda.is_available()


def inference_threads(backend: str, workers: int | None, threads: int | None) -> tuple[int, int | None]:
    """(workers, threads within one model call).  On ONNX, one worker per core (or per `threads`), each call on
    one core: a served call is small (4 texts), and ONNX Runtime spreads one over its threads poorly, as they meet
    at every op, while whole calls side by side never wait on each other (MiniLM int8, 2 cores, the calls of served
    batches without HTTP: 348 texts/s so, 280 on one session of 2 threads).  PyTorch keeps one worker and its own
    threads."""
    if backend not in ONNX_BACKENDS:
        return workers or 1, threads
    cores = threads or _cpu_cores()
    workers = workers or cores
    return workers, max(1, cores // workers)


def _cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS or Windows
        return os.cpu_count() or 1


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a port in use is a one-line error at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LoraclsError(f"cannot listen on {host!r}: {e.strerror}; pass an address of this machine with "
                           "--host") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # only TIME_WAIT is reused, never a live listener
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise LoraclsError(f"cannot listen on {host}:{port} ({e.strerror}); stop what uses it or pick another "
                           "--port") from None
    sock.set_inheritable(True)
    return sock


# -----------------------------------------------------------------------------------------------------------------
class BadRequest(Exception):
    """A request the server refuses: its HTTP status and a one-line reason (TEI's error body)."""

    ERROR_TYPES = {413: "Validation", 422: "Validation", 429: "Overloaded", 500: "Backend"}

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def body(self) -> dict:
        return {"error": str(self), "error_type": self.ERROR_TYPES.get(self.status, "Validation")}


@dataclass
class PredictRequest:
    inputs: list[str | tuple[str, str]]
    """One entry per input: a text, or a (text, text_pair) pair."""
    single: bool
    """The inputs were one string (or one pair): TEI answers with one flat list."""
    truncate: bool = True
    top_k: int | None = None
    """Set by the HF Inference API's `parameters`; such a request gets one list per input, always."""
    hf_api: bool = False


def parse_request(body: bytes, max_input_texts: int) -> PredictRequest:
    """A /predict body, checked; a BadRequest (422 for a wrong shape, 413 for too many texts) names what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nested past what the parser follows
        raise BadRequest(422, f"the body is not valid JSON ({first_line(e)})") from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise BadRequest(422, 'the body must be a JSON object with "inputs": a string, a list of strings or a list '
                              'of [text, text_pair] lists')
    inputs, single = _parse_inputs(data["inputs"])
    if not inputs:
        raise BadRequest(422, '"inputs" is empty; send at least one text')
    if len(inputs) > max_input_texts:
        raise BadRequest(413, f"{len(inputs)} texts in one request, more than the server's {max_input_texts} "
                              "(--max-input-texts); split the request")
    req = PredictRequest(inputs, single, truncate=_flag(data, "truncate", True))
    if _flag(data, "raw_scores", False):
        raise BadRequest(422, '"raw_scores": true is not supported: this server returns probabilities; send '
                              '"raw_scores": false')
    if data.get("truncation_direction", "right") not in ("right", "Right"):
        raise BadRequest(422, '"truncation_direction" must be "right": texts are truncated at the end, as in '
                              'training')
    if "parameters" in data:
        _hf_parameters(req, data["parameters"])
    return req


def _parse_inputs(value) -> tuple[list, bool]:
    """(inputs, single): a string; a list of strings (a batch); a list mixing strings and [text] / [text, pair]
    lists (TEI's batch of sequences)."""
    if isinstance(value, str):
        return [value], True
    if not isinstance(value, list):
        raise BadRequest(422, f'"inputs" must be a string or a list, got {_json_type(value)}')
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and len(item) in (1, 2) and all(isinstance(s, str) for s in item):
            out.append(item[0] if len(item) == 1 else (item[0], item[1]))
        else:
            raise BadRequest(422, f'"inputs"[{i}] must be a string or a list of one or two strings (a text and its '
                                  f'pair), got {_json_type(item)}')
    return out, False


def _flag(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(422, f'"{name}" must be true or false, got {_json_type(value)}')
    return value


def _hf_parameters(req: PredictRequest, params) -> None:
    """The HF Inference API's text-classification parameters: top_k, and function_to_apply (softmax only: the
    probabilities this server computes)."""
    if not isinstance(params, dict):
        raise BadRequest(422, f'"parameters" must be an object, got {_json_type(params)}')
    req.hf_api = True
    top_k = params.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise BadRequest(422, f'"top_k" must be a positive whole number, got {json.dumps(top_k)}')
    req.top_k = top_k
    if params.get("function_to_apply") not in (None, "softmax"):
        raise BadRequest(422, '"function_to_apply" must be "softmax": this server returns probabilities')


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def scores(probs: np.ndarray, labels: list[str], top_k: int | None = None) -> list[dict]:
    """[{"label", "score"}] for one input: every label (or the top_k), highest score first, as TEI sorts them."""
    order = sorted(range(len(labels)), key=lambda i: -float(probs[i]))[:top_k]
    return [{"label": labels[i], "score": float(probs[i])} for i in order]


# -----------------------------------------------------------------------------------------------------------------
class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """What /metrics reports.  Touched from the event loop only (the inference threads report through it)."""

    def __init__(self):
        self.requests: collections.Counter = collections.Counter()  # (route, status) -> count
        self.latency: dict[str, Histogram] = {}  # route -> seconds
        self.batch_texts, self.batch_tokens = Histogram(SIZES), Histogram(tuple(s * 64 for s in SIZES))
        self.inference = Histogram(SECONDS)
        self.texts = self.tokens = 0
        self.in_flight = 0
        self.queued_texts = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[route, status] += 1
        self.latency.setdefault(route, Histogram(SECONDS)).observe(seconds)

    def render(self) -> str:
        out = _family("loracls_requests_total", "counter", "HTTP requests by route and status")
        out += [f'loracls_requests_total{{route="{r}",status="{s}"}} {n}'
                for (r, s), n in sorted(self.requests.items())]
        out += _family("loracls_request_duration_seconds", "histogram", "time from request to response, by route")
        for route, h in sorted(self.latency.items()):
            out += h.lines("loracls_request_duration_seconds", f'route="{route}"')
        out += _family("loracls_batch_texts", "histogram", "texts per inference batch") + \
            self.batch_texts.lines("loracls_batch_texts")
        out += _family("loracls_batch_tokens", "histogram", "tokens per inference batch (no padding)") + \
            self.batch_tokens.lines("loracls_batch_tokens")
        out += _family("loracls_inference_duration_seconds", "histogram", "time of one model call") + \
            self.inference.lines("loracls_inference_duration_seconds")
        out += _family("loracls_texts_total", "counter", "texts classified") + [f"loracls_texts_total {self.texts}"]
        out += _family("loracls_tokens_total", "counter", "tokens classified") + [f"loracls_tokens_total {self.tokens}"]
        out += _family("loracls_queue_texts", "gauge", "texts waiting for a batch") + \
            [f"loracls_queue_texts {self.queued_texts}"]
        out += _family("loracls_requests_in_flight", "gauge", "prediction requests being served") + \
            [f"loracls_requests_in_flight {self.in_flight}"]
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


# -----------------------------------------------------------------------------------------------------------------
class _Job:
    """One request's texts on their way through the batches: its probabilities fill in as batches finish."""

    def __init__(self, n: int, num_labels: int, future: asyncio.Future):
        self.probs = np.empty((n, num_labels), dtype=np.float32)
        self.left, self.future = n, future

    def put(self, index: int, probs: np.ndarray) -> None:
        if self.future.done():  # failed in an earlier batch
            return
        self.probs[index] = probs
        self.left -= 1
        if self.left == 0:
            self.future.set_result(self.probs)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Batcher:
    """Dynamic batching by tokens: queued texts, in arrival order, are taken up to `max_batch_tokens` at a time (a
    batch), sorted by length and cut into model calls of the predictor's batch_size; `workers` inference threads
    run the calls, each one at a time, and take the next batch once every call of this one has started.  Each
    text's row goes back to its request as its call ends."""

    def __init__(self, predictor, max_batch_tokens: int, workers: int, metrics: Metrics):
        self.predictor, self.max_batch_tokens, self.workers = predictor, max_batch_tokens, workers
        self.metrics = metrics
        self.num_labels = predictor.task.outputs(len(predictor.label_map.names))
        self.pending: collections.deque = collections.deque()  # (job, index, token ids)
        self.calls: collections.deque = collections.deque()  # the current batch's calls not started yet
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="loracls-infer")
        self.tasks: list[asyncio.Task] = []
        self.ready: asyncio.Event | None = None

    def start(self) -> None:
        self.ready = asyncio.Event()
        self.tasks = [asyncio.create_task(self._run()) for _ in range(self.workers)]

    async def stop(self) -> None:
        """After the server has answered every request it accepted (uvicorn waits for them before lifespan ends)."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.pool.shutdown(wait=True)

    async def predict(self, token_ids: list[list[int]]) -> np.ndarray:
        """Probabilities [len(token_ids), K] for one request, in its order."""
        job = _Job(len(token_ids), self.num_labels, asyncio.get_running_loop().create_future())
        self.pending.extend((job, i, ids) for i, ids in enumerate(token_ids))
        self.metrics.queued_texts = len(self.pending)
        self.ready.set()
        return await job.future

    def _take(self) -> list:
        """The next batch: queued texts in order while they fit in max_batch_tokens (always at least one)."""
        batch, tokens = [], 0
        while self.pending and (not batch or tokens + len(self.pending[0][2]) <= self.max_batch_tokens):
            item = self.pending.popleft()
            batch.append(item)
            tokens += len(item[2])
        m = self.metrics
        m.queued_texts = len(self.pending)
        m.batch_texts.observe(len(batch))
        m.batch_tokens.observe(tokens)
        return batch

    def _next_call(self) -> list:
        """The next model call's texts: the current batch's next call, or the first of a new batch.  A call pads to
        its longest text, so a batch's texts of similar length share calls: on AG News, calls of 4 from batches of 36
        run 7% more tokens than they hold, where calls of 4 in arrival order would run 32% more."""
        if not self.calls:
            batch = sorted(self._take(), key=lambda item: -len(item[2]))
            size = min(self.predictor.batch_size, -(-len(batch) // self.workers))  # a small batch: on every worker
            self.calls.extend(batch[i:i + size] for i in range(0, len(batch), size))
        return self.calls.popleft()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending and not self.calls:
                self.ready.clear()
                await self.ready.wait()
                continue
            call = self._next_call()
            ids = [item[2] for item in call]
            t0 = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self.pool, self.predictor.outputs, ids)
            except Exception as e:  # a bug or a broken model: these requests fail (500), the server goes on
                log.exception("inference failed on a call of %d texts", len(call))
                for job in {id(item[0]): item[0] for item in call}.values():
                    job.fail(e)
                continue
            m = self.metrics
            m.inference.observe(time.perf_counter() - t0)
            m.texts += len(call)
            m.tokens += sum(len(x) for x in ids)
            for (job, index, _), row in zip(call, probs):
                job.put(index, row)


# -----------------------------------------------------------------------------------------------------------------
class Service:
    """The routes' shared state: the predictor, the batcher, the limits and the metrics."""

    def __init__(self, predictor, settings: ServerSettings):
        self.predictor, self.settings = predictor, settings
        self.labels = list(predictor.label_map.names)
        self.max_length = predictor.config.data.max_length
        self.reads_pairs = predictor.config.data.text_pair_columns is not None
        self.metrics = Metrics()
        self.batcher = Batcher(predictor, settings.max_batch_tokens, settings.workers, self.metrics)
        # One tokenizer thread: tokenizing is quick, and a tokenizer is not shared between threads.
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loracls-tokenize")

    def info(self) -> dict:
        from loracls._version import __version__

        cfg = self.predictor.config
        id2label = {str(i): name for i, name in enumerate(self.labels)}
        return {
            "model_id": str(self.predictor.run_dir), "model_type": {"classifier": {
                "id2label": id2label, "label2id": {name: i for i, name in enumerate(self.labels)}}},
            "base_model": cfg.model, "task": self.predictor.task.problem_type, "labels": self.labels, "backend": self.predictor.backend,
            "max_input_length": self.max_length, "max_batch_tokens": self.settings.max_batch_tokens,
            "max_concurrent_requests": self.settings.max_concurrent_requests,
            "max_client_batch_size": self.settings.max_input_texts, "auto_truncate": True,
            "version": __version__, "loracls_version": __version__,
        }

    async def predict(self, req: PredictRequest) -> list:
        pairs = sum(isinstance(x, tuple) for x in req.inputs)
        if self.reads_pairs and pairs < len(req.inputs):  # a pair model given one text would answer nonsense
            raise BadRequest(422, "this run classifies text pairs; send each input as a [text, text_pair] list, "
                                  'e.g. {"inputs": [["a", "b"]]}')
        if pairs and not self.reads_pairs:
            raise BadRequest(422, "this run classifies single texts; text pairs [text, text_pair] are not supported "
                                  "by it")
        loop = asyncio.get_running_loop()
        token_ids, truncated = await loop.run_in_executor(self.tokenizer_pool, self.predictor.tokenize, req.inputs)
        if truncated and not req.truncate:
            raise BadRequest(413, f"{truncated} of the texts are longer than the model's {self.max_length} tokens; "
                                  'send "truncate": true or shorter texts')
        probs = await self.batcher.predict(token_ids)
        answers = [scores(p, self.labels, req.top_k) for p in probs]
        return answers[0] if req.single and not req.hf_api else answers


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise BadRequest(413, f"the body is {int(size):,} bytes, more than the server's {limit:,}; send fewer or "
                              "shorter texts")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, f"the body is more than the server's {limit:,} bytes; send fewer or shorter texts")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(service: Service):
    """The Starlette application: TEI's routes over `service`."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    settings, metrics = service.settings, service.metrics

    async def predict(request):
        if metrics.in_flight >= settings.max_concurrent_requests:
            return _error(BadRequest(429, f"the server already serves {settings.max_concurrent_requests} requests "
                                          "(--max-concurrent-requests); retry shortly"))
        metrics.in_flight += 1
        try:
            req = parse_request(await read_body(request, settings.payload_limit), settings.max_input_texts)
            request.state.texts = len(req.inputs)
            return JSONResponse(await service.predict(req))
        except BadRequest as e:
            return _error(e)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it
        except Exception as e:  # a bug: this request fails, the server goes on
            log.exception("error while serving %s", request.url.path)
            return _error(BadRequest(500, f"internal error ({first_line(e)})"))
        finally:
            metrics.in_flight -= 1

    def _error(e: BadRequest):
        return JSONResponse(e.body(), status_code=e.status)

    async def health(request):
        return Response(status_code=200)

    async def info(request):
        return JSONResponse(service.info())

    async def prometheus(request):
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:  # uvicorn has answered every accepted request by now
            await service.batcher.stop()
            service.tokenizer_pool.shutdown(wait=True)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/", predict, methods=["POST"]),
              Route("/", health, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/info", info, methods=["GET"]), Route("/metrics", prometheus, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    known = {r.path for r in routes}
    return RequestLog(app, metrics, known)


class RequestLog:
    """ASGI middleware: counts every request by route and status, times it, and logs one line at info level."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - t0
            route = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values
            self.metrics.request(route, status, seconds)
            texts = scope.get("state", {}).get("texts", "-")
            log.info("%s %s %d texts=%s %.1f ms", scope["method"], scope["path"], status, texts, seconds * 1000)


# -----------------------------------------------------------------------------------------------------------------
def serve(run_dir, *, device: str = "auto", threads: int | None = None, **options) -> None:
    """Serve a finished run over HTTP until SIGTERM or Ctrl-C, then finish the requests in flight and return.
    `options` are ServerSettings' fields.  A port in use, or a run without a complete model, is a LoraclsError
    before anything loads."""
    from loracls.rundir import RunDir

    settings = settings_from(options)
    need_server_packages()
    _no_running_loop()
    run = RunDir.open(run_dir)  # the cheap refusals first: the run, the settings against it, then the port
    run.require_model()
    max_length = run.read_config().data.max_length
    if settings.max_batch_tokens < max_length:
        raise LoraclsError(f"--max-batch-tokens {settings.max_batch_tokens} is below the run's max length "
                           f"{max_length}: one text could not fit a batch; pass {max_length} or more")
    backend, why = resolve_backend(settings.backend, device)
    workers, threads = inference_threads(backend, settings.workers, threads)
    settings = dataclasses.replace(settings, workers=workers)
    sock = bind_socket(settings.host, settings.port)
    try:
        batch_size = settings.batch_size or (ONNX_CALL_TEXTS if backend in ONNX_BACKENDS else None)
        try:
            predictor = _open_predictor(run_dir, backend, device, threads, batch_size, workers)
        except LoraclsError as e:
            if settings.backend != "auto" or backend != CPU_FASTEST:
                raise
            # int8 is refused for a run where it would change too many answers (onnx_export.check_int8): auto
            # then serves the exact fp32 graph, and says why
            backend, why = "onnx", f"auto: {first_line(e, 200)}; fp32 instead"
            predictor = _open_predictor(run_dir, backend, device, threads, batch_size, workers)
        print(f"loracls serve: {predictor.run_dir} on backend {predictor.backend} ({why}), "
              f"{len(predictor.label_map.names)} labels, max length {max_length}, {workers} inference "
              f"thread{'s' if workers > 1 else ''}", file=sys.stderr, flush=True)
        _run_uvicorn(build_app(Service(predictor, settings)), sock, settings)
    finally:
        sock.close()


def _open_predictor(run_dir, backend: str, device: str, threads: int | None, batch_size: int | None, workers: int):
    """open_predictor, except that an ONNX session is made for `workers` threads calling it at once."""
    if backend in ONNX_BACKENDS:
        from loracls.onnx_inference import OnnxPredictor

        return OnnxPredictor(run_dir, backend=backend, batch_size=batch_size, threads=threads,
                             concurrent_calls=workers)
    from loracls.predictor import open_predictor

    return open_predictor(run_dir, backend=backend, device=device, threads=threads, batch_size=batch_size)


def _no_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise LoraclsError("loracls.serve() blocks and runs its own event loop, so it cannot run inside one (a "
                       "notebook); run `loracls serve RUN` in a terminal, or loracls.serve() in a thread")


def _run_uvicorn(app, sock: socket.socket, settings: ServerSettings) -> None:
    import uvicorn

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s loracls serve: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(settings.log_level.upper())
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=None)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # listening: print the one line a user (or a script) waits for
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                print(f"loracls serve: ready on http://{host}:{port}", flush=True)

    server = Server(config)

    def stop(signum, frame):
        # Before uvicorn installs its own handlers, and after it restores these: stop gracefully, and never raise
        # (uvicorn re-sends the signal it handled once it is done; the CLI's handler would turn it into exit 130).
        server.should_exit = True

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise LoraclsError(f"the server did not start on {settings.host}:{settings.port}; see the messages above")

