"""The micro-batcher on its own, on an event loop: who shares a forward pass, and who gets what."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from service.errors import InvalidInput
from service.exploration import Exploration
from service.registry.registry import Registry
from service.registry.store import ModelStore
from service.runtime.batching import InferenceExecutor, MicroBatcher
from service.runtime.call import ActCall
from service.runtime.policy import PolicyRuntime
from tests.helpers import SPECS, write_policy


@pytest.fixture()
def runtimes(tmp_path):
    for name in ("q", "q-lstm"):
        write_policy(tmp_path, name, SPECS[name])
    registry = Registry(ModelStore(tmp_path), prepare=PolicyRuntime)
    registry.load_all()
    return {name: registry.resolve(name).runtime for name in ("q", "q-lstm")}


def run(coro_fn, **batcher_kw):
    async def main():
        executor = InferenceExecutor()
        batcher = MicroBatcher(executor, **batcher_kw)
        passes: list[int] = []
        batcher.on_batch = passes.append
        try:
            return await coro_fn(batcher), passes
        finally:
            executor.shutdown()

    return asyncio.run(main())


DET = {"exploration": Exploration.deterministic}


def submit(batcher: MicroBatcher, runtime: PolicyRuntime, obs, **fields):
    return batcher.submit(runtime, ActCall(obs, **fields))


def test_calls_arriving_together_share_one_pass_and_get_their_own_rows(runtimes):
    rt = runtimes["q"]
    obs = [torch.randn(n, 4, generator=torch.Generator().manual_seed(n)) for n in (1, 3, 2)]

    async def calls(b):
        return await asyncio.gather(*(submit(b, rt, o, **DET) for o in obs))

    results, passes = run(calls)
    assert passes == [6]  # one forward pass for the three callers
    for o, r in zip(obs, results, strict=True):
        assert torch.equal(r.action, rt.act(o).action)


def test_max_batch_splits_and_different_exploration_never_mixes(runtimes):
    rt = runtimes["q"]

    async def calls(b):
        return await asyncio.gather(
            *(submit(b, rt, torch.zeros(2, 4), **DET) for _ in range(3)),
            submit(b, rt, torch.zeros(1, 4), exploration=Exploration.random, epsilon=1.0),
        )

    results, passes = run(calls, max_batch=4)
    assert sorted(passes) == [1, 2, 4]  # 2+2 rows, then 2, and the random call alone
    assert [r.exploration for r in results] == [Exploration.deterministic] * 3 + [Exploration.random]


def test_seeded_calls_go_alone_and_reproduce(runtimes):
    rt = runtimes["q"]
    obs = torch.zeros(8, 4)
    kw = {"exploration": Exploration.random, "epsilon": 1.0}

    async def calls(b):
        return await asyncio.gather(
            submit(b, rt, obs, seed=3, **kw), submit(b, rt, obs, seed=3, **kw), submit(b, rt, obs, **kw)
        )

    (a, b, _), passes = run(calls)
    assert sorted(passes) == [8, 8, 8]
    assert torch.equal(a.action, b.action)


def test_recurrent_state_is_split_back_per_caller(runtimes):
    rt = runtimes["q-lstm"]
    g = torch.Generator().manual_seed(0)
    obs = [torch.randn(2, 4, generator=g), torch.randn(1, 4, generator=g)]
    states = [tuple(torch.randn(n, 1, 16, generator=g) for _ in range(2)) for n in (2, 1)]
    inits = [torch.tensor([False, True]), torch.tensor([False])]

    async def calls(b):
        return await asyncio.gather(
            *(submit(b, rt, o, state=s, is_init=i, **DET) for o, s, i in zip(obs, states, inits, strict=True))
        )

    results, passes = run(calls)
    assert passes == [3]
    for o, s, i, r in zip(obs, states, inits, results, strict=True):
        alone = rt.act(o, state=s, is_init=i)
        assert torch.allclose(r.state[0], alone.state[0], atol=1e-6)
        assert torch.allclose(r.state[1], alone.state[1], atol=1e-6)
        assert torch.equal(r.action, alone.action)


def test_a_failing_pass_fails_its_callers_and_the_batcher_goes_on(runtimes):
    rt = runtimes["q"]

    async def calls(b):
        bad = submit(b, rt, torch.zeros(1, 5), **DET)  # wrong width: the forward pass raises
        with pytest.raises(RuntimeError):
            await bad
        return await submit(b, rt, torch.zeros(1, 4), **DET)

    result, passes = run(calls)
    assert result.action.shape == (1,) and passes == [1]


def test_small_passes_run_on_the_loop_and_large_ones_on_the_inference_thread(runtimes, monkeypatch):
    rt = runtimes["q"]
    threads: list[str] = []
    original = rt.forward
    monkeypatch.setattr(
        rt, "forward", lambda *a, **k: threads.append(threading.current_thread().name) or original(*a, **k)
    )

    async def calls(b):
        await submit(b, rt, torch.zeros(64, 4), **DET)
        return await submit(b, rt, torch.zeros(65, 4), **DET)

    result, passes = run(calls, inline_rows=64)
    assert result.action.shape == (65,) and passes == [64, 65]
    assert threads[0] == threading.main_thread().name and threads[1].startswith("inference")


def test_observation_batch_refuses_rows_that_do_not_fit(runtimes):
    rt = runtimes["q"]
    with pytest.raises(InvalidInput, match=r"observations\[1\] has shape \[3\], policy q expects \[4\]"):
        rt.codec.observation_batch([[0.0] * 4, [0.0] * 3], "observations", "q")


def test_small_vector_batches_become_one_tensor_with_their_micro_batch(runtimes):
    """A few rows stay Python lists until the batcher stacks them with the rest of the batch,
    in order, next to calls that came as tensors (larger batches)."""
    from service.runtime.call import VectorRows, as_tensor, stack_observations

    rt = runtimes["q"]
    small = rt.codec.observation_batch([[0.1, 0.2, 0.3, 0.4]], "observation", "q")
    big_rows = [[float(i), 0.5, -0.5, 1e-3] for i in range(100)]  # 400 numbers: a tensor
    big = rt.codec.observation_batch(big_rows, "observations", "q")
    assert type(small) is VectorRows and isinstance(big, torch.Tensor)
    assert as_tensor(small).dtype == torch.float32
    mixed = stack_observations([small, big, small])
    expected = torch.tensor([[0.1, 0.2, 0.3, 0.4], *big_rows, [0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(mixed, expected)
    assert torch.equal(stack_observations([small, small]), expected[[0, -1]])
    with pytest.raises(InvalidInput, match="not finite as float32"):
        rt.codec.observation_batch([[1e39, 0.0, 0.0, 0.0]], "observation", "q")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy's copy, torch's clone
def test_each_callers_state_is_its_own_copy_of_its_rows(dtype):
    """A caller's next state must not be a view of the batch's (it would keep the whole batch
    alive in the session store) and must hold exactly its rows."""
    from service.runtime.call import ActResult, split

    with torch.inference_mode():  # as the forward pass makes it
        h = torch.randn(1, 5, 8).to(dtype).transpose(0, 1)  # [B, layers, hidden], not contiguous
        c = torch.randn(5, 1, 8).to(dtype)
    result = ActResult(torch.arange(5), None, Exploration.deterministic, (h, c))
    calls = [ActCall(torch.zeros(n, 4)) for n in (2, 1, 2)]
    parts = split(result, calls)
    for part, (start, stop) in zip(parts, [(0, 2), (2, 3), (3, 5)], strict=True):
        for mine, batch in zip(part.state, (h, c), strict=True):
            assert mine.dtype == dtype and mine.shape == (stop - start, 1, 8)
            assert torch.equal(mine, batch[start:stop])
            assert mine.untyped_storage().nbytes() == mine.numel() * mine.element_size()  # no view
        assert part.actions == list(range(start, stop))  # what the act route answers from
        assert part.action.tolist() == list(range(start, stop))
    parts[0].state[0].add_(1.0)  # callers do not share memory with each other or the batch
    assert torch.equal(parts[1].state[0], h[2:3]) and not torch.equal(parts[0].state[0], h[0:2])


def test_each_caller_gets_its_rows_of_a_composite_action():
    """A TensorDict action (a composite head) split per caller: its rows as Python values for
    the JSON answer and as a TensorDict for the session, recording and tensor codecs."""
    from tensordict import TensorDict

    from service.runtime.call import ActResult, split

    action = TensorDict({"move": torch.arange(4), "speed": torch.arange(4.0) / 2}, batch_size=[4])
    calls = [ActCall(torch.zeros(n, 3)) for n in (3, 1)]
    first, second = split(ActResult(action, None, Exploration.deterministic, None), calls)
    assert first.actions == [{"move": i, "speed": i / 2} for i in range(3)]
    assert second.actions == [{"move": 3, "speed": 1.5}]
    assert second.action.batch_size == (1,) and second.action["move"].tolist() == [3]
    assert first.action["speed"].tolist() == [0.0, 0.5, 1.0]
    second.action = action[:1]  # a result's action can still be replaced
    assert second.action["move"].tolist() == [0]
