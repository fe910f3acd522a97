"""Run under torchrun: profiles the fake MoE over fake_moe.batches(); rank 0 saves."""

from __future__ import annotations

import sys

import torch.distributed as dist

import esft_rs
from esft_rs.distributed import exit_process, leave_process_group
from fake_moe import FakeMoE, batches

if __name__ == "__main__":
    dist.init_process_group("gloo")
    stats = esft_rs.profile(FakeMoE(), batches())
    if dist.get_rank() == 0:
        stats.save(sys.argv[1])
    leave_process_group()
    exit_process(0)
