"""`lcc run serve` as real server processes on 127.0.0.1, started together once for the module (on ports
the system chooses): the official `openai` client, bad input, overload, a client that goes away, the
SIGTERM drain, the ranks' log files, a killed rank, and a long mixed round that leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from lcc.serve.engine import COUNTS_EVERY_S
from lcc.serve.launch import RankLog
from tests.conftest import ROOT, SPECS
from tests.serve.plans import FLOAT64, LAYOUTS, PROMPTS, serve_plan, spec_of
from tests.serve.reference import greedy, reference_model
from tests.serve.test_routed_experts import counts_of, expected

WORLD1 = [a for s in [*LAYOUTS["world1"], *FLOAT64] for a in ("--set", s)]
MODEL = "tiny-moe"
API_KEY = "sk-lcc-test-0123"
READY = re.compile(r"^lcc run serve: ready, listening at (http://\S+)/v1$")
N_ROUTED = 4
LOGS = re.compile(r"their stderr: (\S+)/rank<N>\.log")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str = ""
    lines: list[str] = field(default_factory=list)  # its stderr, as it comes
    health_when_ready: int | None = None
    reader: threading.Thread | None = None

    def read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def logs(self) -> Path:
        return Path(next(m.group(1) for line in self.lines if (m := LOGS.search(line))))

    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30, limits=httpx.Limits(
        max_connections=32)))  # one for every request (thread-safe): a client of its own each costs ~30 ms

    def get(self, path: str) -> httpx.Response:
        return self.http.get(self.url + path, timeout=10)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.http.post(self.url + path, **kw)

    def metric(self, name: str, default: float | None = None) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        if default is not None:
            return default
        raise AssertionError(f"{name} not in /metrics")

    def wait_ready(self, within_s: float = 90) -> None:
        """Until it says it is ready (its URL is in that line); /health answers at once."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            ready = next((m.group(1) for line in self.lines if (m := READY.match(line))), None)
            if ready is not None:
                self.url = ready
                self.health_when_ready = self.get("/health").status_code
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the rest of its stderr
                raise AssertionError(f"the server ended: {self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"the server did not say it is ready: {self.stderr()}")

    def idle(self) -> bool:
        return (self.metric("lcc_requests_running") == 0 and self.metric("lcc_kv_cache_blocks_used") == 0
                and self.metric("lcc_requests_waiting") == 0)


def start(*extra: str, target: Path = SPECS / "tiny-moe.yaml", sets: list[str] = WORLD1,
          env: dict[str, str] | None = None) -> Server:
    proc = subprocess.Popen([sys.executable, "-m", "lcc", "run", "serve", str(target), *sets, "--port", "0", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    server = Server(proc)
    server.reader = threading.Thread(target=server.read_stderr, daemon=True)
    server.reader.start()
    return server


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    server.reader.join(10)
    server.http.close()
    if server.lines and any(LOGS.search(line) for line in server.lines):
        shutil.rmtree(server.logs(), ignore_errors=True)  # kept by a server that did not stop cleanly


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, Server]]:
    """Three servers started together (their start-ups overlap): one for the API; one that admits one
    sequence at a time with at most 2 waiting (overload), then stopped with SIGTERM; and one of two ranks
    (pp 2, with an API key from LCC_API_KEY), whose rank 1 is killed last."""
    pp2 = serve_plan(tmp_path_factory.mktemp("serve-plans"), "pp2", ("serve.prefix_caching=false",))
    out = {"api": start(), "small": start("--max-num-seqs", "1", "--max-queued", "2", "--shutdown-timeout", "60"),
           "pp2": start(target=pp2, sets=[], env={"LCC_API_KEY": API_KEY})}
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
def test_it_says_it_is_loading_then_that_it_is_ready_once_it_listens(servers):
    """On stderr: a loading line first, the ready line (with the port the system chose for --port 0) only
    once /health answers 200."""
    for server in servers.values():
        loading = next(i for i, line in enumerate(server.lines) if line.startswith("lcc run serve: loading tiny-moe"))
        ready = next(i for i, line in enumerate(server.lines) if READY.match(line))
        assert loading < ready and server.health_when_ready == 200
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url) and not server.url.endswith(":0")
    assert len({s.url for s in servers.values()}) == len(servers)


def stderr_of(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/2")
    except OSError:  # gone, or not ours to look at
        return None


def ranks_by_log(folder: Path) -> dict[int, int]:
    """rank -> pid of the processes whose stderr is a log file in `folder`."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        target = stderr_of(pid)
        if target is not None and Path(target).parent == folder and (m := re.fullmatch(r"rank(\d+)\.log",
                                                                                      Path(target).name)):
            out[int(m.group(1))] = int(pid)
    return out


@pytest.mark.slow
def test_each_rank_writes_its_stderr_into_a_file_of_the_log_folder_it_names(servers):
    for server in servers.values():
        assert server.proc.poll() is None
        folder = server.logs()
        world = 2 if server is servers["pp2"] else 1
        assert sorted(p.name for p in folder.iterdir()) == [f"rank{r}.log" for r in range(world)]
        assert sorted(ranks_by_log(folder)) == list(range(world))


def test_a_rank_log_read_for_a_report_is_its_last_lines(tmp_path):
    """A server's rank may write for weeks: a report carries the end of its log, from a whole line."""
    log = RankLog(tmp_path / "rank0.log", tail=1000)
    try:
        os.write(log.fd, b"".join(b"line %05d\n" % i for i in range(5000)))
        text = log.read().decode()
    finally:
        log.close()
    first, *lines = text.splitlines()
    assert first == f"[the last lines of {tmp_path / 'rank0.log'}]"
    assert lines[-1] == "line 04999" and len(text) <= 1000 + len(first) + 1
    assert all(re.fullmatch(r"line \d{5}", line) for line in lines)
    assert (tmp_path / "rank0.log").stat().st_size == 55_000  # all of it stays in the file


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
    (json.dumps({"model": "tiny-moe", "prompt": "x", "seed": 2**64}).encode(), "less than 18446744073709551616",
     "seed"),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "seed": -1}).encode(), "greater than or equal to 0", "seed"),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "stop": ["s"] * 1000}).encode(), "at most 16 stop strings",
     "stop"),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "stop": ["s" * 300]}).encode(), "at most 256", "stop"),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "max_tokens": 300}).encode(), "at most 255 more",
     "max_tokens"),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "temperature": 2.5}).encode(), "temperature", "temperature"),
    (json.dumps({"model": "tiny-moe", "prompt": "x", "top_p": 0}).encode(), "top_p", "top_p"),
    (b'{"model": "tiny-moe", "prompt": "x", "temperature": NaN}', "NaN is not a JSON value", None),
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
    r = server.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_completion_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    assert server.metric("lcc_prompt_tokens_total") == before and server.idle()


@pytest.mark.slow
def test_a_huge_seed_a_huge_body_and_a_thousand_stop_strings_are_refused_and_the_next_request_served(servers):
    server = servers["api"]
    good = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    started = time.monotonic()
    big = server.post("/v1/completions", content=b'{"model": "tiny-moe", "prompt": "' + b"x" * 10 * 2**20 + b'"}',
                      headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert time.monotonic() - started < 10
    assert server.post("/v1/completions", json=good).status_code == 200
    for bad, param in [({"seed": 2**64, "temperature": 1.0}, "seed"),
                       ({"stop": [f"s{i}" for i in range(1000)]}, "stop")]:
        r = server.post("/v1/completions", json={**good, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert server.post("/v1/completions", json=good).status_code == 200
    assert server.get("/health").status_code == 200 and server.idle()


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
    """While it drains the server still listens: /health and new requests get 503, the running request
    finishes; then it exits 0."""
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
    deadline = time.monotonic() + 10
    while (health := server.get("/health")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (health.status_code, health.text) == (503, "draining")
    refused = server.post("/v1/completions", json={"model": MODEL, "prompt": "late", "max_tokens": 2})
    assert refused.status_code == 503 and "draining" in refused.json()["error"]["message"]
    assert server.metric("lcc_requests_running") == 1  # still generating: all this happened during the drain
    t.join(60)
    assert server.proc.wait(30) == 0, server.stderr()
    assert '"finish_reason": "length"' in result["text"] and result["text"].endswith("data: [DONE]\n\n")
    assert "every rank ended" in server.proc.stdout.read()


@pytest.mark.slow
def test_an_api_key_and_routed_experts_across_two_ranks(servers):
    """LCC_API_KEY: /v1/ without the key (or with another) is 401 in OpenAI's error body, /health and /metrics
    stay open; with it, the official client is served. Across pp 2 (layers 0-1 on rank 0, 2-3 on rank 1),
    return_routed_experts and the per-expert counts in /metrics equal the reference model's routers."""
    server = servers["pp2"]
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = server.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert server.get("/v1/models").status_code == 401
    assert server.get("/health").status_code == 200 and server.get("/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(server).models.list()
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    first = ok.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=N_ROUTED, temperature=0,
                                  extra_body={"return_routed_experts": True})
    time.sleep(COUNTS_EVERY_S + 0.1)  # the next step collects rank 1's counts
    ok.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=1, temperature=0)
    model = reference_model(spec_of("world1"))
    tokens = greedy(model, PROMPTS[1], N_ROUTED)
    assert first.choices[0].model_extra["routed_experts"] == expected(model, PROMPTS[1], tokens)
    text = server.get("/metrics").text
    got = {(int(layer), int(expert)): float(n)  # the exposition sorts the labels
           for expert, layer, n in re.findall(r'lcc_expert_tokens_total\{expert="(\d+)",layer="(\d+)"\} (\S+)', text)}
    want = counts_of(model, [PROMPTS[1] + tokens[:-1], PROMPTS[3]], spec_of("world1").model.moe.n_experts)
    assert got == {(layer, e): float(n) for layer, row in want.items() for e, n in enumerate(row)}


@pytest.mark.slow
def test_a_killed_rank_ends_the_server_with_its_error(servers):
    """At pp 2: rank 1 is killed while the server runs; the launcher ends (exit 1), naming it, with the end
    of the rank's log file in its report, and the server is gone; never a hang."""
    server = servers["pp2"]
    folder = server.logs()
    with open(folder / "rank1.log", "a") as log:  # as if rank 1 had written it
        log.write("a line rank 1 wrote before it was killed\n")
    os.kill(ranks_by_log(folder)[1], signal.SIGKILL)
    assert server.proc.wait(30) == 1
    server.reader.join(10)
    said = server.stderr()
    assert "lcc run serve: rank 1 exited with code -9" in said, said
    report = Path(re.search(r"full tracebacks: (\S+)", said).group(1))
    try:
        assert "a line rank 1 wrote before it was killed" in report.read_text()
    finally:
        shutil.rmtree(report.parent, ignore_errors=True)
    with pytest.raises(httpx.TransportError):
        server.get("/health")
