"""A model's chat template (beside its tokenizer, as Hugging Face keeps it) builds the prompt tokens that
transformers' apply_chat_template builds; a compiled plan carries it; the server renders it, refuses what the
template refuses with a 400, and, with an API key, answers /v1/ only with it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.data.chat_template import ChatTemplate, ChatTemplateError, find, plan_chat_template
from lcc.data.tokenizer import HFTokenizer
from lcc.serve.served import ServedModel
from lcc.serve.server import Metrics, build_app
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.interop.hf_models import save_tokenizer
from tests.serve.test_loop import MODEL, engine, started  # noqa: F401 - the engine fixture

# a ChatML template (as Qwen's), refusing a conversation that does not start with a system or user turn
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('a conversation starts with a "
    "system or user turn') }}{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "You are a teacher."}, {"role": "user", "content": "The cat sat"},
            {"role": "assistant", "content": "on the mat."}, {"role": "user", "content": " And then? "}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chat-model")
    save_tokenizer(out)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "chat_template": TEMPLATE}))
    return out


def test_prompt_tokens_equal_transformers(folder):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    want = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    template = ChatTemplate(find(folder / "tokenizer.json"))
    text = template.render(MESSAGES)
    assert text.startswith("<s><|im_start|>system\nYou are a teacher.<|im_end|>\n")
    assert HFTokenizer(folder / "tokenizer.json", 256).encode(text, special=False) == list(want)


def test_a_template_file_wins_and_a_refusal_names_itself(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert ChatTemplate(find(tmp_path / "tokenizer.json")).render(MESSAGES[1:2]) == "[user]The cat sat"
    with pytest.raises(ChatTemplateError, match="starts with a system or user turn"):
        ChatTemplate(find(folder / "tokenizer.json")).render(MESSAGES[2:])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja|Unexpected end"):
        ChatTemplate(find(tmp_path / "tokenizer.json"), str(tmp_path / "chat_template.jinja"))


def test_a_compiled_plan_carries_the_template(folder, tmp_path):
    spec = load_spec(SPECS / "tiny-moe.yaml", [f"model.tokenizer={folder / 'tokenizer.json'}",
                                               "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1",
                                               "cluster.gpus_per_node=1"])
    write(compile_plan(spec, "serve"), tmp_path / "plan")
    assert plan_chat_template(tmp_path / "plan").render(MESSAGES[:2]) == ChatTemplate(
        find(folder / "tokenizer.json")).render(MESSAGES[:2])


def test_the_server_renders_the_template_and_asks_for_the_key(engine):  # noqa: F811
    template = ChatTemplate({"template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                         "{% if messages[-1].role == 'system' %}{{ raise_exception('no reply "
                                         "to a system turn') }}{% endif %}<assistant>"})
    loop = started(engine)
    app = build_app(loop, Metrics(), engine.serving, ServedModel(MODEL, engine.tokenizer, template), max_queued=8,
                    api_key="s3cret")

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lcc",
                                     timeout=60) as client:
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                    "temperature": 0}
            key = {"Authorization": "Bearer s3cret"}
            return [await client.post("/v1/chat/completions", json=chat),
                    await client.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer nope"}),
                    await client.get("/health"),
                    await client.post("/v1/chat/completions", json={**chat, "return_token_ids": True}, headers=key),
                    await client.post("/v1/chat/completions", headers=key,
                                      json={**chat, "messages": [{"role": "system", "content": "Hi"}]}),
                    await client.post("/v1/chat/completions", json=chat, headers=key)]

    try:
        missing, wrong, health, ok, refused, after = asyncio.run(scenario())
    finally:
        loop.stop()
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert health.status_code == 200
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == len(b"<user>Hi<assistant>")
    assert ok.json()["prompt_token_ids"] == list(b"<user>Hi<assistant>")  # return_token_ids: the prompt built
    assert len(ok.json()["choices"][0]["token_ids"]) == ok.json()["usage"]["completion_tokens"] == 2
    assert refused.status_code == 400 and "no reply to a system turn" in refused.json()["error"]["message"]
    assert after.status_code == 200  # and it goes on serving
