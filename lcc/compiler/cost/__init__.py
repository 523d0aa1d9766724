"""The analytic cost model (torch-free): see docs/cost-model.md."""

from lcc.compiler.cost.report import SCHEMA, CostModel, cost_report

__all__ = ["SCHEMA", "CostModel", "cost_report"]
