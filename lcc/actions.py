"""The pipeline action notation shared by the compiler (which writes schedules) and the runtime (which
reads them): `{stage}{kind}{microbatch}`, as torch.distributed.pipelining writes it (`0F3`, `1SEND_B2`; a
zero-bubble schedule splits a backward `B` into its input gradient `I` and its weight gradients `W`),
and `{stage}REDUCE_GRAD` (no micro-batch): the stage's gradient buckets are complete after its last
backward."""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "REDUCE_GRAD")
_PATTERN = re.compile(r"^(\d+)(?:(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)|(REDUCE_GRAD))$")


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str
    mb: int | None

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{'' if self.mb is None else self.mb}"

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _PATTERN.match(text.strip())
        if not m:
            raise ValueError(f"not an action: {text!r} (expected e.g. 0F3, 1B2, 0SEND_F3, 1RECV_B2, 0REDUCE_GRAD)")
        if m.group(4):
            return cls(int(m.group(1)), m.group(4), None)
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


def read_actions(text: str) -> list[list[Action]]:
    """Per pipeline rank action lists from an `actions.txt` (annotations after `#` and the step actions
    after the pipeline are ignored)."""
    ranks: list[list[Action]] = []
    for line in text.splitlines():
        body = line.split("#", 1)[0].strip()
        if body.startswith("pp_rank "):
            ranks.append([])
        elif body and body[0].isdigit() and ranks:
            ranks[-1].append(Action.parse(body))
    return ranks


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    """The pipeline rank that runs global (virtual) stage `stage`: `stage mod pp`, except zbv's V, where rank r
    runs stages r and 2 pp - 1 - r (the first and the last stage on rank 0)."""
    if schedule == "zbv":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp
