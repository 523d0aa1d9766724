"""The pipeline action notation shared by the compiler (which writes schedules) and the runtime (which
reads them): `{stage}{kind}{microbatch}`, as torch.distributed.pipelining writes it (`0F3`, `1SEND_B2`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B")
_PATTERN = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B)(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _PATTERN.match(text.strip())
        if not m:
            raise ValueError(f"not an action: {text!r} (expected e.g. 0F3, 1B2, 0SEND_F3, 1RECV_B2)")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


def read_actions(text: str) -> list[list[Action]]:
    """Per pipeline rank action lists from an `actions.txt` (annotations after `#` and gradient-reduction
    lines are ignored)."""
    ranks: list[list[Action]] = []
    for line in text.splitlines():
        body = line.split("#", 1)[0].strip()
        if body.startswith("pp_rank "):
            ranks.append([])
        elif body and not body.startswith(("REDUCE_GRAD", "GATHER_PARAMS")) and ranks:
            ranks[-1].append(Action.parse(body))
    return ranks
