"""The files a checkpoint keeps beside its tensors, so that it can be served and exported on its own.

    tokenizer.json        the model's tokenizer (the spec's `model.tokenizer`, as the plan carries it)
    chat_template.json    its chat template, as the plan carries it (lcc.data.chat_template)
    hf/                   a Hugging Face model's own files that lcc does not read into the spec
                          (config.json, generation_config.json, tokenizer_config.json, special_tokens_map.json,
                          chat_template.jinja): `lcc checkpoint import-hf` keeps them, training carries them
                          from the checkpoint it starts from or resumes, `lcc checkpoint export-hf` writes
                          them back

They are listed with their sizes and hashes in the checkpoint's identity like every other file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PLAN_FILES = ("tokenizer.json", "chat_template.json")
HF_FOLDER = "hf"
HF_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja")


def plan_files(plan_dir: Path) -> dict[str, Path]:
    """A plan's tokenizer and chat template, by the name a checkpoint keeps them under."""
    return {name: Path(plan_dir) / name for name in PLAN_FILES if (Path(plan_dir) / name).is_file()}


def hf_files(model_dir: Path, under: str = "") -> dict[str, Path]:
    """The Hugging Face side files of a model folder (`under` ""), or a checkpoint's (`under` "hf")."""
    folder = Path(model_dir) / under
    return {f"{HF_FOLDER}/{name}": folder / name for name in HF_FILES if (folder / name).is_file()}


def kept_files(checkpoint: Path) -> dict[str, Path]:
    """What a checkpoint keeps beside its tensors."""
    return {**{n: p for n in PLAN_FILES if (p := Path(checkpoint) / n).is_file()}, **hf_files(checkpoint, HF_FOLDER)}


def copy_into(folder: Path, files: dict[str, Path]) -> None:
    for name, source in sorted(files.items()):
        target = Path(folder) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
