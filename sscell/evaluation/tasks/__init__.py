"""Evaluation tasks; importing a task module registers it (`sscell.evaluation.tasks.registry`)."""
# in the order the results show them
from sscell.evaluation.tasks import knn, linear_probe, reconstruction, integration, umap, downstream  # noqa: F401, I001
from sscell.evaluation.tasks.registry import EvalTask, Inputs, Outcome, load_tasks, register, registered

__all__ = ["EvalTask", "Inputs", "Outcome", "load_tasks", "register", "registered"]
