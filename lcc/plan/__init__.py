"""The plan as typed data: what the compiler fills, what codegen renders and what the runtime executes.

Neither compiler nor runtime: both import it, so the runtime never reaches back into the compiler.
"""

from lcc.plan.codec import PlanFormatError, dumps, loads, read_plan
from lcc.plan.types import (
    PLAN_VERSION,
    Buffer,
    Collective,
    GradBucket,
    Mesh,
    Parameter,
    Plan,
    Precision,
    RankTable,
    Role,
    Schedule,
    ServeFormat,
    Shard,
    StepAction,
    Zero,
)

__all__ = ["PLAN_VERSION", "Buffer", "Collective", "GradBucket", "Mesh", "Parameter", "Plan", "PlanFormatError",
           "Precision", "RankTable", "Role", "Schedule", "ServeFormat", "Shard", "StepAction", "Zero", "dumps",
           "loads", "read_plan"]
