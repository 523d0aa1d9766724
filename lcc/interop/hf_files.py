"""The files of an exported Hugging Face model folder besides its weights: config.json, generation_config.json,
the tokenizer and its chat template (lcc checkpoint export-hf).

config.json is computed from the spec (lcc.interop.hf_config.hf_config) over the imported model's own
config.json where the checkpoint keeps one (lcc.runtime.model_files): what the spec decides comes from the
spec, what lcc does not model (token ids, the router loss coefficient, the original's other fields) stays as
imported. The end-of-sequence ids are the spec's `serve.stop_token_ids`. An export imported again and
exported again writes the same files.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from lcc.runtime.model_files import HF_FOLDER, kept_files

# what hf_config writes only as transformers' defaults: an imported model's own values stay
AS_IMPORTED = ("router_aux_loss_coef", "output_router_logits", "use_cache", "initializer_range", "attention_dropout",
               "router_jitter_noise")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _read(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path is not None else None


def _eos(stops: list[int], original: Any) -> Any:
    """config.json's eos_token_id: the original's where it names only stop tokens, else the stop tokens."""
    named = original if isinstance(original, list) else [original] if original is not None else []
    if not stops or (named and set(named) <= set(stops)):
        return original
    return stops[0] if len(stops) == 1 else list(stops)


def model_config(computed: dict[str, Any], original: dict[str, Any] | None, stops: list[int]) -> dict[str, Any]:
    """config.json: the spec's fields over the original's (its own values of AS_IMPORTED kept)."""
    out = dict(original or {})
    out.update({k: v for k, v in computed.items() if not (k in AS_IMPORTED and k in out)})
    eos = _eos(stops, out.get("eos_token_id"))
    if eos is not None:
        out["eos_token_id"] = eos
    return dict(sorted(out.items()))


def generation_config(original: dict[str, Any] | None, stops: list[int]) -> dict[str, Any] | None:
    """generation_config.json: the original's with the spec's stop tokens; None where there is neither."""
    out = dict(original or {})
    if stops:
        out["eos_token_id"] = stops[0] if len(stops) == 1 else list(stops)
    return dict(sorted(out.items())) if out else None


def write_model_files(out: Path, folder: Path, spec: Any, computed: dict[str, Any],
                      tokenizer: Path | None) -> dict[str, bool]:
    """Write config.json, generation_config.json, the tokenizer (`tokenizer`, else the checkpoint's) and its
    chat template into `out`, from checkpoint folder `folder`. Says which of the tokenizer and the chat
    template were written."""
    kept = kept_files(folder)
    stops = list(spec.serve.stop_token_ids) if spec.serve is not None else []
    original = _read(kept.get(f"{HF_FOLDER}/config.json"))
    _write_json(out / "config.json", model_config(computed, original, stops))
    generation = generation_config(_read(kept.get(f"{HF_FOLDER}/generation_config.json")), stops)
    if generation is not None:
        _write_json(out / "generation_config.json", generation)
    source = tokenizer if tokenizer is not None else kept.get("tokenizer.json")
    if source is not None:
        write_text_atomically(out / "tokenizer.json", Path(source).read_text())
    side = {name: p for name in TOKENIZER_FILES if (p := kept.get(f"{HF_FOLDER}/{name}")) is not None}
    for name, path in side.items():
        write_text_atomically(out / name, path.read_text())
    template = _read(kept.get("chat_template.json"))
    if template is not None and "chat_template.jinja" not in side and "tokenizer_config.json" not in side:
        # a template the plan found beside the spec's tokenizer: as transformers 5 saves one
        write_text_atomically(out / "chat_template.jinja", template["template"])
        _write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                    **template.get("special_tokens", {})})
    has_template = template is not None or "chat_template.jinja" in side or _has_template(side)
    return {"tokenizer": source is not None, "chat_template": has_template}


def _has_template(side: dict[str, Path]) -> bool:
    config = side.get("tokenizer_config.json")
    return config is not None and bool(json.loads(config.read_text()).get("chat_template"))


def write_text_atomically(path: Path, text: str) -> None:
    """`path` holds `text` complete or is untouched: written to a new file in the same folder, synced, then
    renamed over it, so that an interrupted export (a full disk, a kill) never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")
