"""`flower-supernode` with a shorter idle poll (§14): `python -m f3crec.flower.supernode --poll 0.05 <its args>`.

Flower 1.42's SuperNode loop sleeps 3 s whenever it asks the SuperLink for a message and none is there
yet, and 0.5 s between checks for its ClientApp's reply. F3CRec's server sends one message per node and
waits for the answer before the next (train, validate, save a slot, ...), so nearly every message meets
an idle node: 61 messages of a smoke run would wait about 3 s each. This entry point is the stock
SuperNode (`flwr.supernode.cli.flower_supernode`, same arguments, same protocol) with those waits capped at
`--poll` seconds; `--poll 3` is Flower's own behaviour. The cap replaces the `time` module that
`flwr.supernode.start_client_internal` sees (a non-public module: the `fl` extra pins the minor).
"""
from __future__ import annotations

import sys
import time

import flwr.supernode.start_client_internal as loop
from flwr.supernode.cli import flower_supernode


class _CappedTime:
    """The `time` module, except that `sleep` waits at most `cap` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def main(argv: list[str]) -> None:
    poll = 3.0
    if argv[:1] == ["--poll"]:
        poll, argv = float(argv[1]), argv[2:]
    if not poll > 0:
        raise SystemExit(f"--poll must be > 0 seconds, got {poll}")
    loop.time = _CappedTime(poll)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
