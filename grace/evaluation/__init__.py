"""How well a trained GRACE retrieves: recall, memorization, old vs new images, reports."""

from grace.evaluation.metrics import EvalResult, evaluate, held_out_queries, recall_at_k
from grace.evaluation.reports import example_grid, write_report

__all__ = [
    "EvalResult",
    "evaluate",
    "example_grid",
    "held_out_queries",
    "recall_at_k",
    "write_report",
]
