"""The spec language: YAML with line numbers -> validated pydantic models, or a SpecError."""

from lcc.spec.errors import Location, Problem, SpecError
from lcc.spec.load import load_spec, locate, resolved, spec_hash, validate
from lcc.spec.models import Spec

__all__ = ["Location", "Problem", "Spec", "SpecError", "load_spec", "locate", "resolved", "spec_hash", "validate"]
