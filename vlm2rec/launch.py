"""Data-parallel VLM2Rec on one machine: N processes of `vlm2rec.main`, one line when any of them fails.

    python -m vlm2rec.launch --nproc 2 -- --config vlm2rec/configs/smoke.yaml train.batch_size=4
    python -m vlm2rec.launch --nproc 2 -- --resume runs/vlm2rec/<dataset>/<run>

`train.batch_size` is per process: N processes at batch B/N train the 1-process objective at batch B
(parallel.py). Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free
port unless --port), as torchrun sets them, and accelerate joins the process group (gloo on CPUs, nccl on
GPUs). Rank 0 prints and writes the run folder; the other ranks' output is kept only to report their
error. When a rank exits with an error the others are stopped (SIGTERM, then SIGKILL after --grace-s) and
the launch exits with that rank's status and one line on stderr naming it, so a failing rank never leaves
the others waiting in a collective. Several machines: `accelerate launch --num_machines M
--machine_rank R --main_process_ip HOST --num_processes N -m vlm2rec.main ...` or torchrun --nnodes.
"""
from __future__ import annotations

import sys
from typing import Optional

from common.launch import launch, main as launch_main  # noqa: F401  (launch: for callers in Python)


def main(argv: Optional[list[str]] = None) -> int:
    return launch_main(argv, "vlm2rec", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
