"""The slot pool's ordering guarantee: a streamed answer's slot is free by the time its consumer sees the end."""

from __future__ import annotations

import asyncio
import time

from cnllm.core.server.queue import SlotPool
from tests.fake_model import ByteModel


def test_a_finished_stream_frees_its_slot_before_its_end_is_delivered():
    pool = SlotPool([ByteModel(b"ab")], max_waiting=0)
    release = pool._release_from_thread

    def slow_release(loop, generator):  # a worker thread descheduled between its last item and giving the slot back
        time.sleep(0.05)
        release(loop, generator)

    pool._release_from_thread = slow_release  # type: ignore[method-assign]

    async def answer() -> int:
        generator = await pool.acquire()
        async for _ in pool.stream(generator, iter([1, 2, 3]), lambda: None):
            pass
        return pool.busy

    try:
        for _ in range(3):  # each a new event loop that closes as soon as the answer is read, as a test client's does
            assert asyncio.run(answer()) == 0
    finally:
        pool.close()
