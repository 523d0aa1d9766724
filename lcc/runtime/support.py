"""What the runtime can run: checked before any rank starts, and again by each rank."""

from __future__ import annotations

from typing import Any


class RunError(RuntimeError):
    """A run that cannot start or that ended with a rank's failure; its text is for the user."""


def check_supported(spec: dict[str, Any]) -> None:
    """Refuse, before starting any rank, what the runtime does not implement (never run without it)."""
    par = spec["parallelism"]
    if par["zero"] or par["activation_checkpointing"] != "none":
        raise RunError(f"the plan asks for ZeRO {par['zero']} and activation checkpointing "
                       f"{par['activation_checkpointing']!r}; the runtime does not implement them yet "
                       "(set parallelism.zero=0 and parallelism.activation_checkpointing=none to run)")
    routing = spec.get("routing")
    if routing and routing["balance"]["aux_loss_coef"] and par["tp"] > 1:
        raise RunError("routing.balance.aux_loss_coef > 0 with tp > 1 is not supported yet")
