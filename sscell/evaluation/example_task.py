"""The docs' example evaluation task (docs/extending.md, "Adding an evaluation task"): how often a
test cell's nearest validation cell has its cell type, for every method. Select it with
`--config.eval.module=sscell.evaluation.example_task` and `nearest_neighbour` in `eval.tasks`."""
import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from sscell.evaluation.tasks import Inputs, Outcome, register


@register("nearest_neighbour", needs=("embeddings",), columns=("nn_accuracy",), headline=("nn_accuracy",))
def nearest_neighbour(inputs: Inputs, outcome: Outcome) -> None:
    """1-nearest-neighbour accuracy of the test cells, the validation cells as the reference."""
    val, test = inputs.val, inputs.test
    for method in inputs.methods:  # the model, then the baselines
        classifier = KNeighborsClassifier(n_neighbors=1).fit(val.embeddings[method], val.labels["cell_type"])
        predicted = classifier.predict(test.embeddings[method])
        outcome.rows[method]["nn_accuracy"] = float(np.mean(predicted == test.labels["cell_type"]))
    outcome.described.append(f"nearest_neighbour: {len(test)} test cells, {len(val)} validation cells as reference")
