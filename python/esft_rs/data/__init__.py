"""Task data, from chat files to token rows: reading and packing (``task_data``), the
tokenizer (``tokenizer``), chat templates (``chat_template``) and the checks of token
rows against a model before the first forward pass (``preflight``).

The names below are the package's public face; torch is imported only by the functions
that build tensors.
"""

from esft_rs.data.task_data import (
    DEFAULT_SEED,
    IGNORE_INDEX,
    MAX_SEED,
    ROLES,
    Message,
    Packed,
    TaskData,
    causal_lm_loss,
    encode_conversation,
    format_conversation,
    loss_tokens,
    pack,
    read_task_data,
)
from esft_rs.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_SEED",
    "IGNORE_INDEX",
    "MAX_SEED",
    "ROLES",
    "Message",
    "Packed",
    "TaskData",
    "Tokenizer",
    "causal_lm_loss",
    "encode_conversation",
    "format_conversation",
    "load_tokenizer",
    "loss_tokens",
    "pack",
    "read_task_data",
]
