"""Waiting for the hand-off writer in tests and benchmarks (training never waits for it)."""
from launcher.validation.handoff import Writer


def idle(writer: Writer) -> bool:
    """Nothing queued or being written: every slot is back in the free queue."""
    return writer.free.qsize() == len(writer.slots)
