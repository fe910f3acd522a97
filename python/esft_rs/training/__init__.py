"""ESFT training: only the selected experts train; the result is an adapter.

``esft_rs.train(...)`` runs a whole job (``api``); the other modules hold its
parts: ``config`` (the YAML keys), ``freeze`` (what trains), ``batches``
(validation split and data order), ``loop`` (the loop), ``checkpoint``
(resume) and ``outputs`` (what OUT_DIR holds). torch loads on first use.
"""

from esft_rs.training.api import TrainResult, train
from esft_rs.training.config import TrainConfig, load_config

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
