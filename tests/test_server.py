"""`loracls serve`: the real server in a subprocess on a loopback port, spoken to over HTTP (urllib, raw sockets and
huggingface_hub's InferenceClient), checked against `loracls predict` on the same run."""

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_int8_gate import undecided  # noqa: F401 (a fixture: a run whose int8 is refused)

from helpers import loracls_command, train_args
from loracls.cli import main

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")

MAX_TEXTS, MAX_CONCURRENT, BATCH_TOKENS, PAYLOAD = 8, 4, 128, 20000
LONG_TEXT = "market " * 400  # far past the run's 48 tokens


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_roberta_dir, small_agnews):
    out = tmp_path_factory.mktemp("serve") / "run"
    assert main(train_args(tiny_roberta_dir, small_agnews / "train.csv", out, "--epochs", "2", "--batch-size", "16",
                           "--max-length", "48", "--lr", "1e-3", "--device", "cpu")) == 0
    return out


@pytest.fixture(scope="module")
def texts(small_agnews):
    import csv

    with open(small_agnews / "test.csv", encoding="utf-8", newline="") as f:
        rows = [" ".join(r[1:]) for r in csv.reader(f)]
    return rows[:20] + ["", LONG_TEXT]


@pytest.fixture(scope="module")
def reference(run, texts, tmp_path_factory):
    """`loracls predict --backend onnx` on `texts`: name -> probability per text (this also exports the run)."""
    folder = tmp_path_factory.mktemp("ref")
    (folder / "in.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    assert main(["predict", str(run), "--input", str(folder / "in.jsonl"), "--output", str(folder / "out.jsonl"),
                 "--backend", "onnx", "--text-columns", "text"]) == 0
    return [json.loads(line)["probs"] for line in (folder / "out.jsonl").read_text().splitlines()]


class Server:
    """`python -m loracls serve` in a subprocess; `url` once it prints that it is ready."""

    def __init__(self, run, *flags):
        self.proc = subprocess.Popen(loracls_command("serve", run, "--port", "0", *flags), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.stderr = []
        self.stderr_reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self.stderr_reader.start()
        deadline = time.monotonic() + 60
        self.url = None
        while self.url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if "ready on " in line:
                self.url = line.split("ready on ", 1)[1].strip()
        if self.url is None:
            self.proc.kill()
            raise AssertionError(f"the server did not start: {''.join(self.stderr)[-2000:]}")
        self.host, self.port = self.url.removeprefix("http://").rsplit(":", 1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.exit_code()

    def exit_code(self) -> int:
        """Once the process has exited, with its whole stderr read."""
        code = self.proc.wait(timeout=30)
        self.stderr_reader.join(timeout=10)
        return code

    def logged(self, words: str) -> bool:
        """Whether stderr has a line with `words` (waiting a little for it: it is read in a thread)."""
        deadline = time.monotonic() + 5
        while not any(words in line for line in self.stderr):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@pytest.fixture(scope="module")
def server(run, reference):
    """Three inference threads, whatever the cores: calls of several batches run at once on one ONNX session."""
    s = Server(run, "--backend", "onnx", "--max-input-texts", str(MAX_TEXTS), "--max-concurrent-requests",
               str(MAX_CONCURRENT), "--max-batch-tokens", str(BATCH_TOKENS), "--payload-limit", str(PAYLOAD),
               "--workers", "3", "--log-level", "info")
    yield s
    assert s.stop() == 0


def post(url: str, body, route: str = "/predict", raw: bool = False) -> tuple[int, object]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url + route, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, route: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url + route, timeout=30) as r:
        return r.status, r.read()


def check_answer(answer: list[dict], expected: dict, atol: float = 1e-5) -> None:
    """TEI's shape: every label once, best first, with loracls predict's probability."""
    assert [a["score"] for a in answer] == sorted((a["score"] for a in answer), reverse=True)
    assert sorted(a["label"] for a in answer) == sorted(expected)
    for a in answer:
        assert abs(a["score"] - expected[a["label"]]) < atol, (a, expected)


def test_predict_equals_loracls_predict(server, texts, reference):
    for i in (0, 1, len(texts) - 2, len(texts) - 1):  # single texts (the empty and the long one too): one flat list
        status, answer = post(server.url, {"inputs": texts[i]})
        assert status == 200
        check_answer(answer, reference[i])
    status, answers = post(server.url, {"inputs": texts[:MAX_TEXTS]})  # a batch: one list per text, in order
    assert status == 200 and len(answers) == MAX_TEXTS
    for answer, expected in zip(answers, reference):
        check_answer(answer, expected)
    status, answers = post(server.url, {"inputs": [[t] for t in texts[3:6]], "truncate": True}, route="/")  # TEI's
    assert status == 200 and len(answers) == 3
    for answer, expected in zip(answers, reference[3:6]):
        check_answer(answer, expected)


def test_concurrent_requests_each_get_their_own_answers_in_order(server, texts, reference):
    """Requests of 1-8 texts from several clients at once: batched across requests and split (128 tokens a batch),
    yet each gets exactly its own answers, in its order."""
    rng = np.random.default_rng(0)
    jobs = [[int(i) for i in rng.integers(0, len(texts), rng.integers(1, MAX_TEXTS + 1))] for _ in range(24)]
    results = {}

    def client(k):
        for j in range(k, len(jobs), MAX_CONCURRENT):
            results[j] = post(server.url, {"inputs": [texts[i] for i in jobs[j]]})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(MAX_CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, idx in enumerate(jobs):
        status, answers = results[j]
        assert status == 200 and len(answers) == len(idx)
        for answer, i in zip(answers, idx):
            check_answer(answer, reference[i])
    metrics = get(server.url, "/metrics")[1].decode()
    batches = _metric(metrics, "loracls_batch_tokens_count")
    assert _metric(metrics, 'loracls_batch_tokens_bucket{le="128"}') == batches  # no batch over the limit
    assert batches < _metric(metrics, "loracls_texts_total")  # texts shared batches


def _metric(text: str, name: str) -> float:
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_inference_client_gets_the_same_labels(server, texts, reference, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline blocks every request; this one is loopback

    client = InferenceClient(base_url=server.url)
    answer = client.text_classification(texts[0])
    check_answer([{"label": a.label, "score": a.score} for a in answer], reference[0])
    top = client.text_classification(texts[1], top_k=2)
    best = sorted(reference[1].items(), key=lambda kv: -kv[1])[:2]
    assert [a.label for a in top] == [name for name, _ in best]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 422, "not valid JSON"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422, "not valid JSON"),  # deeper than the parser recurses
    (b'["a"]', 422, '"inputs"'),
    (b'{"text": "a"}', 422, '"inputs"'),
    (b'{"inputs": 3}', 422, "string or a list"),
    (b'{"inputs": ["a", 3]}', 422, '"inputs"[1]'),
    (b'{"inputs": [["a", "b", "c"]]}', 422, '"inputs"[0]'),
    (b'{"inputs": []}', 422, "empty"),
    (b'{"inputs": "a", "truncate": "yes"}', 422, '"truncate"'),
    (b'{"inputs": "a", "raw_scores": true}', 422, "raw_scores"),
    (b'{"inputs": [["a", "b"]]}', 422, "single texts"),
    (json.dumps({"inputs": ["a"] * (MAX_TEXTS + 1)}).encode(), 413, "--max-input-texts"),
    (json.dumps({"inputs": LONG_TEXT, "truncate": False}).encode(), 413, "48 tokens"),
    (json.dumps({"inputs": "x" * PAYLOAD}).encode(), 413, "bytes"),
])
def test_bad_requests_get_their_status_and_the_server_goes_on(server, texts, reference, body, status, words):
    code, answer = post(server.url, body, raw=True)
    assert code == status and words in answer["error"] and "\n" not in answer["error"], answer
    code, answer = post(server.url, {"inputs": texts[0]})
    assert code == 200
    check_answer(answer, reference[0])


def _partial_request(server, body: bytes) -> socket.socket:
    """A request whose headers are sent and whose body is not: in flight on the server until the body follows."""
    s = socket.create_connection((server.host, int(server.port)), timeout=30)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    return s


def _finish(s: socket.socket, body: bytes) -> tuple[int, object]:
    s.sendall(body[5:])
    reply = b""
    while not reply.endswith(b"]") or b"\r\n\r\n" not in reply:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    s.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def _wait_in_flight(server, n: int) -> None:
    deadline = time.monotonic() + 10
    while _metric(get(server.url, "/metrics")[1].decode(), "loracls_requests_in_flight") < n:
        assert time.monotonic() < deadline, "requests did not reach the server"
        time.sleep(0.02)


def test_over_the_concurrency_limit_is_429_at_once(server, texts, reference):
    body = json.dumps({"inputs": [texts[2]]}).encode()
    held = [_partial_request(server, body) for _ in range(MAX_CONCURRENT)]
    _wait_in_flight(server, MAX_CONCURRENT)
    t0 = time.monotonic()
    code, answer = post(server.url, {"inputs": texts[0]})
    assert code == 429 and "--max-concurrent-requests" in answer["error"] and time.monotonic() - t0 < 2
    for s in held:  # the held requests are still answered
        code, answers = _finish(s, body)
        assert code == 200
        check_answer(answers[0], reference[2])
    assert post(server.url, {"inputs": texts[0]})[0] == 200


def test_health_info_metrics_and_request_log(server, run):
    assert get(server.url, "/health")[0] == 200
    info = json.loads(get(server.url, "/info")[1])
    labels = json.loads((run / "labels.json").read_text())
    assert info["labels"] == labels and info["model_type"]["classifier"]["id2label"]["0"] == labels[0]
    assert info["backend"] == "onnx" and info["max_input_length"] == 48 and info["task"]
    assert info["max_client_batch_size"] == MAX_TEXTS and info["loracls_version"]
    post(server.url, {"inputs": ["a", "b"]})
    post(server.url, b"{", raw=True)
    metrics = get(server.url, "/metrics")[1].decode()
    assert 'loracls_requests_total{route="/predict",status="200"}' in metrics
    assert 'loracls_requests_total{route="/predict",status="422"}' in metrics
    for name in ("loracls_request_duration_seconds_bucket", "loracls_batch_texts_count", "loracls_queue_texts",
                 "loracls_tokens_total"):
        assert name in metrics, name
    assert server.logged("POST /predict 200 texts=2")  # one line per request at info
    assert server.logged("3 inference threads")


def test_port_in_use_and_incomplete_run_are_one_line_errors(server, run, tmp_path):
    res = subprocess.run(loracls_command("serve", run, "--port", server.port), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "another --port" in res.stderr, res.stderr
    (tmp_path / "empty").mkdir()
    res = subprocess.run(loracls_command("serve", tmp_path / "empty"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr


def test_auto_serves_fp32_where_int8_is_refused(undecided):
    """A run whose int8 graph would change too many answers (onnx_export.check_int8): `auto` serves the exact fp32
    graph instead, and says why."""
    s = Server(undecided)
    try:
        assert json.loads(get(s.url, "/info")[1])["backend"] == "onnx"
        status, answer = post(s.url, {"inputs": "some words"})
        assert status == 200 and len(answer) == 2
    finally:
        assert s.stop() == 0
    assert any("int8 agrees with fp32 on only" in line and "fp32 instead" in line for line in s.stderr), s.stderr


def test_sigterm_mid_burst_loses_no_accepted_request(run, texts, reference):
    """The default backend (on this CPU onnx-int8, or the fp32 graph where the run's int8 is refused).  SIGTERM
    while requests are in flight: each request the server accepted is answered, correctly; then it exits 0."""
    s = Server(run, "--log-level", "info")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert s.logged("backend onnx") and s.logged(f", {cores} inference thread")  # ONNX: one per core
    body = json.dumps({"inputs": texts[:4]}).encode()
    held = _partial_request(s, body)
    _wait_in_flight(s, 1)
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                results.append(post(s.url, {"inputs": texts[4:9]}))
            except (OSError, http.client.HTTPException):  # refused or closed: never accepted
                return

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    code, answers = _finish(held, body)  # began before SIGTERM: finished after it
    stop.set()
    for t in threads:
        t.join()
    assert s.exit_code() == 0
    assert code == 200 and results  # the held request, and the burst's
    for answer, expected in zip(answers, reference[:4]):
        check_answer(answer, expected, atol=0.05)  # int8 against fp32
    for code, answers in results:
        assert code == 200
        for answer, expected in zip(answers, reference[4:9]):
            check_answer(answer, expected, atol=0.05)
    served = [line for line in s.stderr if "POST /predict" in line]
    assert len(served) == len(results) + 1 and all(" 200 " in line for line in served)


def test_loracls_serve_is_the_server_function():
    import loracls
    import loracls.onnx_inference  # noqa: F401  (the ONNX predictor: importing it must not shadow the function)

    assert callable(loracls.serve) and loracls.serve.__module__ == "loracls.api"


def test_help_names_every_flag():
    res = subprocess.run(loracls_command("serve", "--help"), capture_output=True, text=True)
    assert res.returncode == 0
    for flag in ("--host", "--port", "--backend", "--max-batch-tokens", "--max-concurrent-requests",
                 "--max-input-texts", "--workers", "--batch-size", "--log-level", "--threads", "onnx-int8"):
        assert flag in res.stdout, flag


def test_a_pair_run_serves_pairs_as_loracls_predict_does(tiny_bert_dir, shared_dir, tmp_path):
    """A run trained on text pairs (RTE) answers [text, text_pair] inputs with `loracls predict`'s probabilities,
    and refuses a lone text in one line."""
    rte = shared_dir / "data" / "glue" / "rte"
    if not (rte / "train.tsv").is_file():
        pytest.skip(f"GLUE files not found at {rte}")
    run = tmp_path / "pairs"
    assert main(train_args(tiny_bert_dir, rte / "train.tsv", run, "--epochs", "1", "--max-train-samples", "64",
                           "--max-length", "48", "--device", "cpu")) == 0
    pairs = [("A man walks his dog in the park.", "A dog is outside."), ("Prices rose sharply.", "Nothing changed.")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"sentence1": a, "sentence2": b}) + "\n" for a, b in pairs))
    assert main(["predict", str(run), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "--backend", "onnx"]) == 0
    expected = [json.loads(line)["probs"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    s = Server(run, "--backend", "onnx")
    try:
        status, answers = post(s.url, {"inputs": [list(p) for p in pairs]})
        assert status == 200 and len(answers) == 2
        for answer, want in zip(answers, expected):
            check_answer(answer, want)
        status, answer = post(s.url, {"inputs": "only one text"})
        assert status == 422 and "text pairs" in answer["error"], answer
    finally:
        assert s.stop() == 0
