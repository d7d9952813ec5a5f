"""bench/emulated_engine.py is a measuring instrument (bench/serving_load.py --engine emulated): its engine
must batch like vLLM's: an idle engine starts a step on arrival, a request arriving mid-step joins the
next one, every step gives each running request one token and lasts at least the step time."""

from __future__ import annotations

import asyncio

from bench.emulated_engine import Engine, Sequence


async def test_requests_join_at_step_boundaries() -> None:
    loop = asyncio.get_running_loop()
    engine = Engine(step_s=0.05)
    task = loop.create_task(engine.run())
    try:
        start = loop.time()
        first = Sequence(2)
        engine.add(first)
        await asyncio.sleep(0.02)  # timers fire in deadline order: this is mid-step whatever the load
        second = Sequence(1)
        engine.add(second)

        assert await first.tokens.get() is True
        assert engine.steps == 1 and loop.time() - start >= 0.05
        assert second.tokens.empty()  # arrived during step 1: waits for step 2

        assert await second.tokens.get() is True
        assert engine.steps == 2 and loop.time() - start >= 0.1
        assert await first.tokens.get() is True  # its second token, in the same step
        assert await first.tokens.get() is False and await second.tokens.get() is False  # both done

        await asyncio.sleep(0.12)
        assert engine.steps == 2  # no work, no steps
    finally:
        task.cancel()
