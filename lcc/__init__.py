"""lcc: compile a Mixture-of-Experts model spec into an executable parallel plan, and run it."""

from lcc.spec import Spec, SpecError, load_spec

__version__ = "0.1.0"

__all__ = ["Spec", "SpecError", "__version__", "load_spec"]
