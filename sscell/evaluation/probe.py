"""Linear probe on frozen embeddings: multinomial logistic regression, fit on train, chosen on val, scored on test.

Protocol: the embeddings are standardised with the training cells' mean and sd; a
scikit-learn LogisticRegression (lbfgs, 'balanced' class weights as in the study's classifier,
so rare types count as in macro F1) is fit on a sample of training cells for each inverse
regularisation strength C in `C_GRID`, in increasing order, each fit starting from the previous
solution (a warm-started regularisation path: a few times faster than cold fits, same optimum up
to the solver's tolerance); the C with the best macro F1 on validation cells is kept, and the
test cells' predictions are returned. Train, validation and test cells come
from different donors, as in the kNN task. The fits use one BLAS thread: their matrices (cells x
embedding dims) are too small to gain from more, and on a busy CPU more threads made them 15-30x
slower (threads waiting on each other at every lbfgs step).
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sscell.errors import SscellError
from sscell.evaluation.metrics import f1_scores

C_GRID = (0.01, 0.1, 1.0, 10.0)
MAX_ITER = 300


def linear_probe(train_emb: np.ndarray, train_labels: np.ndarray, val_emb: np.ndarray, val_labels: np.ndarray,
                 test_emb: np.ndarray, c_grid: tuple[float, ...] = C_GRID, seed: int = 0) -> tuple[np.ndarray, float]:
    """(predicted labels of the test cells, the C chosen on the validation cells)."""
    if len(np.unique(train_labels)) < 2:
        raise SscellError("the linear probe needs at least 2 cell types among the training cells; "
                          "drop linear_probe from eval.tasks")
    scaler = StandardScaler().fit(train_emb)
    train_x, val_x, test_x = (scaler.transform(e) for e in (train_emb, val_emb, test_emb))
    model = LogisticRegression(class_weight="balanced", max_iter=MAX_ITER, warm_start=True, random_state=seed)
    best = None
    for c in sorted(c_grid):
        model.C = c
        with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)  # an unconverged fit is still a valid probe
            model.fit(train_x, train_labels)
        score = f1_scores(val_labels, model.predict(val_x))["macro_f1"]
        if best is None or score > best[0]:
            best = (score, c, model.predict(test_x))
    return best[2], best[1]
