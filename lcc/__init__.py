"""lcc: compile a Mixture-of-Experts model spec into an executable parallel plan, and run it.

`import lcc` stays light (no torch): the model-building API is imported on first use.
"""

from typing import Any

from lcc.spec import Spec, SpecError, load_spec

__version__ = "0.1.0"

__all__ = ["Spec", "SpecError", "__version__", "build_model", "load_spec"]


def __getattr__(name: str) -> Any:
    if name == "build_model":
        from lcc.model import build_model

        return build_model
    raise AttributeError(f"module 'lcc' has no attribute {name!r}")
