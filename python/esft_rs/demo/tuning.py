"""Each method's learning rate, chosen on the downstream task's validation split alone.

The paper tunes every method's rate for its best validation score. Exact match on the
demo's task saturates: every rate past the one that learns the task scores 1.0 on
validation. Those ties are broken by the validation loss, the finer measure of the same
downstream fit (how confidently the held-out answers are produced), so that each method
ends where the downstream data alone puts it, as an unsaturated score would. General
accuracy (forgetting) never enters: the paper's tuning does not see it either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def choose_rate(validation: Mapping[float, tuple[float, float]]) -> float:
    """The rate with the best validation exact match; among ties, the lowest validation
    loss (a non-finite loss counts as worst); then the smaller rate.

    ``validation``: rate -> (exact match, mean answer-token loss) on the validation split.
    """
    if not validation:
        raise ValueError("no learning rate to choose from")

    def key(lr: float) -> tuple[float, float, float]:
        acc, loss = validation[lr]
        return (-acc, loss if math.isfinite(loss) else math.inf, lr)

    return min(validation, key=key)
