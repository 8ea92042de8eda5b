"""Data-parallel FLAME on one machine: N processes of `flame.main`, and one line when any of them fails.

    python -m flame.launch --nproc 2 -- --config flame/configs/amazon-toys.yaml      # 2 GPUs (or 2 CPU ranks)
    python -m flame.launch --nproc 2 -- --resume runs/flame/amazon-toys/<run>

Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free port unless
--port), as torchrun sets them; flame/parallel.py joins the process group. Rank 0 prints and writes the
run folder; the other ranks' output is kept only to report their error. When a rank exits with an error
the others are stopped (SIGTERM, then SIGKILL after --grace-s) and the launch exits with that rank's
status and one line on stderr naming it, so a failing rank never leaves the others waiting in a
collective. Several machines: torchrun or `accelerate launch` with their --nnodes / --num_machines options.
"""
from __future__ import annotations

import sys
from typing import Optional

from common.launch import launch, main as launch_main  # noqa: F401  (launch: for callers in Python)


def main(argv: Optional[list[str]] = None) -> int:
    return launch_main(argv, "flame", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
