"""The analytic cost model (torch-free): see docs/cost-model.md."""

from lcc.compiler.cost.model import CostModel
from lcc.compiler.cost.report import SCHEMA, cost_report

__all__ = ["SCHEMA", "CostModel", "cost_report"]
