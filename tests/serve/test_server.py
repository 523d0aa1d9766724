"""`lcc run serve` as a real server process on 127.0.0.1: the official `openai` client, bad input, overload,
a client that goes away, SIGTERM, a killed rank, and a long mixed round that leaves nothing behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from lcc.runtime.support import RunError
from lcc.serve.launch import ServeOptions, serve
from tests.conftest import ROOT, SPECS
from tests.serve.plans import FLOAT64, LAYOUTS, serve_plan

WORLD1 = [a for s in [*LAYOUTS["world1"], *FLOAT64] for a in ("--set", s)]
MODEL = "tiny-moe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30, **kw)

    def metric(self, name: str, default: float | None = None) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        if default is not None:
            return default
        raise AssertionError(f"{name} not in /metrics")

    def wait_ready(self, within_s: float = 60) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server ended: {self.proc.communicate()}")
            try:
                if self.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become healthy")

    def idle(self) -> bool:
        return (self.metric("lcc_requests_running") == 0 and self.metric("lcc_kv_cache_blocks_used") == 0
                and self.metric("lcc_requests_waiting") == 0)


def start(*extra: str) -> Server:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lcc", "run", "serve", str(SPECS / "tiny-moe.yaml"), *WORLD1,
                             "--port", str(port), *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return Server(proc, f"http://127.0.0.1:{port}")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.communicate()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    """Two servers started together (their start-ups overlap): one for the API, one that admits one sequence
    at a time with at most 2 waiting (overload), and is then stopped with SIGTERM."""
    out = {"api": start(), "small": start("--max-num-seqs", "1", "--max-queued", "2", "--shutdown-timeout", "20")}
    try:
        for s in out.values():
            s.wait_ready()
        yield out
    finally:
        for s in out.values():
            stop(s)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)


@pytest.mark.slow
def test_openai_client_completions_chat_and_streaming(servers):
    server = servers["api"]
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    whole = c.completions.create(model=MODEL, prompt="The teacher", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(b"The teacher")
    chunks = list(c.completions.create(model=MODEL, prompt="The teacher", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    streamed = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "length"
    raw = server.post("/v1/completions", json={"model": MODEL, "prompt": [72, 105], "max_tokens": 2, "stream": True})
    assert raw.text.endswith("data: [DONE]\n\n") and all(b.startswith("data: ") for b in raw.text.split("\n\n") if b)


BAD = [
    (b'{"model": "tiny-moe", "prompt": "x"', "not valid JSON", None),
    (b'\xff\xfe{"model": "tiny-moe"}', "not valid UTF-8", None),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "max_tokens": "ten"}).encode(), "max_tokens", "max_tokens"),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "max_tokens": 0}).encode(), "greater than 0", "max_tokens"),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), "does not exist", "model"),
    (json.dumps({"model": "tiny-moe", "prompt": "x" * 300}).encode(), "no room to generate", "prompt"),
    (json.dumps({"model": "tiny-moe"}).encode(), "prompt", "prompt"),
    (json.dumps([1, 2]).encode(), "JSON object", None),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "n": 2}).encode(), "n", "n"),
]


@pytest.mark.slow
def test_bad_input_gets_400_with_an_openai_error_and_changes_nothing(servers):
    server = servers["api"]
    before = server.metric("lcc_prompt_tokens_total")
    for body, message, param in BAD:
        r = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and message in error["message"], (body, error)
        assert error["param"] == param
    r = server.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert server.metric("lcc_prompt_tokens_total") == before and server.idle()


@pytest.mark.slow
def test_a_client_that_goes_away_has_its_request_aborted(servers):
    server = servers["api"]
    aborted = server.metric('lcc_requests_finished_total{reason="abort"}', 0.0)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True}) as r:
        for _ in r.iter_lines():
            if server.metric("lcc_kv_cache_blocks_used") > 0:
                break
    deadline = time.monotonic() + 10
    while not server.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.idle()
    assert server.metric('lcc_requests_finished_total{reason="abort"}') == aborted + 1
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 200},
                   timeout=httpx.Timeout(30, read=0.3))
    deadline = time.monotonic() + 10
    while not server.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.idle()
    assert server.metric('lcc_requests_finished_total{reason="abort"}') == aborted + 2


@pytest.mark.slow
def test_a_burst_beyond_max_queued_gets_429(servers):
    server = servers["small"]  # one sequence at a time, 2 may wait

    def one(i: int) -> httpx.Response:
        return server.post("/v1/completions", json={"model": MODEL, "prompt": f"burst {i}", "max_tokens": 24})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8)))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 3 and 429 in codes, codes
    busy = next(r for r in replies if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
    assert server.idle()


@pytest.mark.slow
def test_200_mixed_requests_leave_nothing_behind(servers):
    server = servers["api"]

    def round_of_200() -> None:
        def one(i: int) -> int:
            if i % 2:
                body, message, _ = BAD[i % len(BAD)]
                return server.post("/v1/completions", content=body,
                                   headers={"content-type": "application/json"}).status_code
            return server.post("/v1/completions", json={"model": MODEL, "prompt": f"request {i}", "max_tokens": 2,
                                                        "temperature": 0.5, "seed": i}).status_code
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(one, range(200)))
        assert codes.count(200) == 100 and codes.count(400) == 100, codes

    round_of_200()
    rss = server.metric("process_resident_memory_bytes")
    round_of_200()
    grown = server.metric("process_resident_memory_bytes") - rss
    assert server.get("/health").status_code == 200 and server.idle()
    assert grown < 50 * 2**20, grown


@pytest.mark.slow
def test_sigterm_drains_running_requests_then_exits(servers):
    server = servers["small"]
    result: dict[str, str] = {}

    def stream() -> None:
        r = server.post("/v1/completions", json={"model": MODEL, "prompt": "drain", "max_tokens": 60, "stream": True})
        result["text"] = r.text

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 10
    while server.metric("lcc_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert server.proc.wait(30) == 0, server.proc.communicate()
    assert '"finish_reason": "length"' in result["text"] and result["text"].endswith("data: [DONE]\n\n")
    assert "every rank ended" in server.proc.communicate()[0]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_killed_rank_ends_the_server_with_its_error(tmp_path):
    """At tp 2: rank 1 is killed while the server runs; the launcher ends, naming it, and /health is 503 or
    gone meanwhile, never a hang."""
    plan = serve_plan(tmp_path, "tp2")
    port = free_port()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve(plan, ServeOptions(None, "127.0.0.1", port, 8, 5.0))
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    launcher = threading.Thread(target=run)
    launcher.start()
    server = Server(None, f"http://127.0.0.1:{port}")  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if server.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    (rank1,) = [p.pid for p in multiprocessing.active_children() if p.name == "lcc-rank1"]
    os.kill(rank1, signal.SIGKILL)
    launcher.join(30)
    assert not launcher.is_alive()
    assert isinstance(failure[0], RunError) and str(failure[0]).startswith("rank 1 exited with code -9"), failure
    with pytest.raises(httpx.TransportError):
        server.get("/health")
    assert Path(plan).is_dir()
