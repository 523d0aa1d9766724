"""Structured output (`response_format` json_object / json_schema, `guided_regex`, `guided_grammar`): replies of a
model with random weights, sampled, all follow what was asked (checked by jsonschema and re, not by the
grammar library); bad schemas get a 400 naming what is wrong and the server goes on; the vocabulary of a
tokenizer.json is read whether or not llguidance knows its decoder."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest
import torch

from lcc.data.tokenizer import HFTokenizer
from lcc.serve.engine import Engine
from lcc.serve.loop import EngineLoop
from lcc.serve.rank import ServeRank
from lcc.serve.served import ServedModel
from lcc.serve.server import Metrics, build_app
from lcc.serve.structured import GrammarError, Grammars
from tests.interop.hf_models import save_tokenizer
from tests.serve.plans import serve_plan
from tests.serve.test_loop import MODEL

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
REQUESTS = 100
MAX_TOKENS = 120  # the longest reply SCHEMA allows, in bytes, is shorter: every reply can close


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    plan = serve_plan(tmp_path_factory.mktemp("structured"), "world1", ("serve.max_batch=32",))
    engine = Engine(ServeRank(plan, 0))
    loop = EngineLoop(lambda: engine, keep_alive_s=60, metrics=Metrics())
    loop.begin()
    assert loop.ready.wait(30)
    app = build_app(loop, Metrics(), engine.serving, ServedModel(MODEL, engine.tokenizer), max_queued=REQUESTS)
    yield app
    loop.stop()


def post_all(app, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lcc",
                                     timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))
    return asyncio.run(scenario())


def test_a_hundred_sampled_replies_all_validate_against_the_schema(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    requests = [("/v1/chat/completions" if i % 2 else "/v1/completions",
                 {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": i, "response_format": fmt,
                  **({"messages": [{"role": "user", "content": f"person {i}"}]} if i % 2 else
                     {"prompt": f"person {i}:"})}) for i in range(REQUESTS)]
    replies = post_all(server, requests)
    texts = []
    for r in replies:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert choice["finish_reason"] == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        texts.append(text)
    assert len(set(texts)) > REQUESTS // 2  # sampled, not one reply over and over


def test_json_object_a_regex_and_a_grammar(server):
    requests = [("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 60, "temperature": 1.0, "seed": s,
                                     "response_format": {"type": "json_object"}}) for s in range(4)]
    requests += [("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 20, "temperature": 1.0, "seed": s,
                                      "guided_regex": r"(yes|no), [0-9]{2,3}"}) for s in range(4)]
    requests += [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "?"}],
                                           "max_tokens": 20, "temperature": 1.0, "seed": s,
                                           "guided_grammar": 'start: answer "!"\nanswer: "red" | "green" | "blue"'})
                 for s in range(4)]
    replies = post_all(server, requests)
    texts = [(r.json()["choices"][0].get("text") or r.json()["choices"][0]["message"]["content"]) for r in replies]
    for text, r in zip(texts, replies, strict=True):
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), text
    objects = [t for t, r in zip(texts[:4], replies, strict=False) if r.json()["choices"][0]["finish_reason"] == "stop"]
    assert objects and all(isinstance(json.loads(t), dict) for t in objects)
    assert all(re.fullmatch(r"(yes|no), [0-9]{2,3}", t) for t in texts[4:8]), texts[4:8]
    assert all(t in ("red!", "green!", "blue!") for t in texts[8:]), texts[8:]


@pytest.mark.parametrize("body,param,says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format.json_schema.schema", "nope"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema", "type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "'yaml'"),
    ({"guided_regex": "[0-9"}, "guided_regex", "unclosed character class"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "only one"),
])
def test_a_bad_schema_gets_400_naming_it_and_the_next_request_is_served(server, body, param, says):
    bad, good = post_all(server, [("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, **body}),
                                  ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4})])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    assert says in bad.json()["error"]["message"], bad.text
    assert good.status_code == 200


def sample_under(grammars: Grammars, grammar: str, vocab: int, seed: int, steps: int = 40) -> list[int]:
    """Tokens drawn from random logits under the grammar until it is done (or the end of sequence)."""
    constraint, g, out = grammars.constraint(grammar), torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        if constraint.done:
            break
        allowed = constraint.allowed()
        logits = torch.randn(vocab, generator=g).masked_fill(~allowed, float("-inf"))
        token = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=g))
        if token in grammars.stops:
            break
        constraint.advance(token)
        out.append(token)
    return out


@pytest.mark.parametrize("kind", ["metaspace", "byte_level"])
def test_a_tokenizer_json_vocabulary_whether_or_not_llguidance_reads_its_decoder(tmp_path, kind):
    """A SentencePiece-style (Metaspace) tokenizer llguidance cannot read: each token's bytes from the
    tokenizer; a byte-level BPE llguidance reads itself. Either way the decoded text follows the expression."""
    if kind == "metaspace":
        save_tokenizer(tmp_path)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        text = "the cat sat on the mat 0123456789 yes no " * 50
        tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(str(tmp_path / "tokenizer.json"))
    vocab = 320
    hf = HFTokenizer(tmp_path / "tokenizer.json", vocab)
    grammars = Grammars(hf, [2] if kind == "metaspace" else [0], vocab)
    grammar = grammars.compile("regex", r"(yes|no) [0-9]{1,3}")
    for seed in range(5):
        text = hf.decode(sample_under(grammars, grammar, vocab, seed))
        assert re.fullmatch(r"(yes|no) [0-9]{1,3}", text), text
    with pytest.raises(GrammarError, match="Invalid type: nope"):
        grammars.compile("json_schema", {"type": "object", "properties": {"a": {"type": "nope"}}})
