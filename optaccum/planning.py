"""Choosing k: plan from a memory budget, evaluate speed and agreement, scale the learning rate."""

from optaccum._evaluation import Evaluation as Evaluation
from optaccum._evaluation import EvaluationRow as EvaluationRow
from optaccum._evaluation import evaluate as evaluate
from optaccum._planning import Plan as Plan
from optaccum._planning import PlanRow as PlanRow
from optaccum._planning import plan as plan
from optaccum._scaling import scale_learning_rate as scale_learning_rate

__all__ = [
  "Evaluation",
  "EvaluationRow",
  "Plan",
  "PlanRow",
  "evaluate",
  "plan",
  "scale_learning_rate",
]
