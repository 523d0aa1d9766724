"""What the HTTP front knows of the model it serves: its name, tokenizer, chat template and MoE layers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lcc.data.chat_template import ChatTemplate, plan_chat_template
from lcc.data.tokenizer import Tokenizer, plan_tokenizer
from lcc.serve.structured import Grammars


@dataclass
class ServedModel:
    name: str  # what requests name in `model`
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None = None  # the model's own; None: lcc's format for byte-level models
    moe_layers: int = 1  # MoE layers: a model without any has no routed experts to return
    stop_tokens: list[int] = field(default_factory=list)  # the model's end-of-sequence ids
    grammars: Grammars = field(init=False)  # structured output's requests compiled against its vocabulary

    def __post_init__(self) -> None:
        self.grammars = Grammars(self.tokenizer, self.stop_tokens, self.tokenizer.vocab_size)

    @classmethod
    def of_plan(cls, plan_dir: Path, name: str) -> ServedModel:
        spec = json.loads((Path(plan_dir) / "spec.json").read_text())
        model, serve = spec["model"], spec.get("serve") or {}
        moe = model.get("moe")
        layers = 0 if moe is None else model["n_layers"] if moe["layers"] == "all" else len(moe["layers"])
        return cls(name, plan_tokenizer(Path(plan_dir)), plan_chat_template(Path(plan_dir)), layers,
                   sorted(serve.get("stop_token_ids") or []))
