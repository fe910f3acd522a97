"""Checkpoint and run files, through the Rust core (``esft_rs._core``): inspection,
merge and split (``inspection``, ``merging``), adapters (``adapter``), tensor names
(``naming``), expert configs (``expert_config``), safetensors dtypes (``dtypes``),
tensors streamed into a new safetensors file (``tensor_stream``), reading inputs
(``inputs``) and writing outputs (``outputs``). Nothing here imports torch at import time.
"""
