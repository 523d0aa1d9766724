"""A model's chat template: found beside its tokenizer as Hugging Face keeps it (`chat_template.jinja`, else
`chat_template` in `tokenizer_config.json`, with the special tokens the template refers to), carried in a
compiled plan (`chat_template.json`), and rendered as transformers' `apply_chat_template` renders it: jinja2's
sandboxed environment (no attribute access outside it), trim_blocks and lstrip_blocks, loop controls, a
`tojson` filter, `raise_exception` and `strftime_now`, with `add_generation_prompt`. The rendered text is
tokenized without the tokenizer's own special tokens: the template writes them.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

PLAN_FILE = "chat_template.json"
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that cannot be read, or that refuses the messages (its `raise_exception`)."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find(tokenizer: Path) -> dict[str, Any] | None:
    """{"template": text, "special_tokens": {...}} from the folder of `tokenizer` (a tokenizer.json), or None
    where the folder has no chat template. A template in tokenizer_config.json may be a list of named ones:
    the one named `default` is taken."""
    folder = Path(tokenizer).parent
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    try:
        if config_file.is_file():
            config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatTemplateError(f"{config_file}: not readable JSON ({exc})") from None
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        return None
    special = {k: t for k in SPECIAL if (t := _token_text(config.get(k))) is not None}
    return {"template": template, "special_tokens": special}


class ChatTemplate:
    def __init__(self, data: dict[str, Any], where: str = "the chat template"):
        self.text, self.special, self.where = data["template"], dict(data.get("special_tokens", {})), where
        self.compiled  # noqa: B018 - a template that does not parse is refused where it is loaded

    @cached_property
    def compiled(self) -> Any:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.text)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{self.where}: {exc}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`; ChatTemplateError names what the template refused."""
        import jinja2

        try:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **self.special)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{self.where} could not render these messages: {exc}") from None


def plan_chat_template(plan_dir: Path) -> ChatTemplate | None:
    """A compiled plan's chat template (its chat_template.json), or None: lcc's own format."""
    path = Path(plan_dir) / PLAN_FILE
    if not path.is_file():
        return None
    return ChatTemplate(json.loads(path.read_text()), str(path))
