"""A rank's memory: on CPU the bytes of live tensor storages, on CUDA the caching allocator's peak.

On CPU every op's outputs are seen by a dispatch mode; each storage is counted once when it first
appears and uncounted when it is freed (so views, in-place ops and tensors autograd saves are counted
exactly once, and for as long as they live). Storages made before tracking starts are added with
`track`. Storages marked as model states (parameters, gradients, optimizer states) are also counted
apart, so that the peak of everything else (activations, gathered parameters, temporaries) is known.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.states = 0  # live bytes of storages marked as model states
        self.other_peak = 0  # peak of live - states
        self._seen: set[int] = set()
        self._states: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)

    def mark_states(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)
            key = t.untyped_storage()._cdata
            if key in self._seen and key not in self._states:
                self._states.add(key)
                self.states += t.untyped_storage().nbytes()

    def reset_peak(self) -> None:
        self.peak = self.live
        self.other_peak = self.live - self.states

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or t.is_meta:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        nbytes = storage.nbytes()
        if key in self._seen or nbytes == 0:
            return
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.other_peak = max(self.other_peak, self.live - self.states)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if key in self._seen:
            self._seen.discard(key)
            self.live -= nbytes
        if key in self._states:
            self._states.discard(key)
            self.states -= nbytes


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())
