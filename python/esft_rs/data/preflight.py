"""Checks of tokenised data against the model, run before the first forward pass.

A token id beyond the embedding table is an index error on CPU and a device-side
assert (the process aborts) on CUDA; rows without answer tokens train nothing and
evaluate to NaN. Each is found here, in one line, before any work.
"""

from __future__ import annotations

import os
from typing import Any

from esft_rs.errors import InvalidFileError, MismatchError, option


def vocab_size(model: Any) -> int | None:
    """Rows of the model's input embedding (else its config's ``vocab_size``)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) else None


def context_length(model: Any) -> int | None:
    """The model's ``max_position_embeddings``, when its config says."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def fit_to_context(seq_length: int, context: int | None) -> tuple[int, str | None]:
    """The row length to use: ``seq_length``, or the model's ``context`` (its
    ``max_position_embeddings``) when shorter, with a note saying so (train's and plan's rule)."""
    if context is None or seq_length <= context:
        return seq_length, None
    return context, (f"rows are cut to the model's context of {context} tokens"
                     f" (max_position_embeddings), not seq_length {seq_length}"
                     f" ({option('seq_length')})")


def check_token_ids(lowest: int, highest: int, model: Any, origin: str | os.PathLike[str]) -> None:
    """Every id in [lowest, highest] must index the model's embedding."""
    vocab = vocab_size(model)
    if lowest < 0:
        raise InvalidFileError(f"{os.fspath(origin)}: token id {lowest} is negative")
    if vocab is not None and highest >= vocab:
        raise MismatchError(
            f"{os.fspath(origin)}: token id {highest} is beyond the model's vocabulary of"
            f" {vocab} (was the data tokenised for another model?)"
        )


def check_answer_tokens(count: int, origin: str | os.PathLike[str], how: str) -> None:
    """Some label token must remain, or there is nothing to learn or score."""
    if count <= 0:
        raise InvalidFileError(
            f"{os.fspath(origin)}: no answer tokens left {how} (no assistant turn, or every"
            ' one is masked with "mask": 1 or cut off)'
        )
