"""The C replay (haq.sim.native_replay) against the Python timeline it stands in for: per-layer LRU
and Fiddler over random traces, budgets, decode batches, prefill and both machine kinds give
the same counters and the same latencies, bit for bit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from haq.runtime.hardware import load_profile
from haq.runtime.placement import profile_statistics
from haq.runtime.policies import PolicyContext, make_policy
from haq.runtime.predictor import CostPredictor
from haq.runtime.synthetic import generate_synthetic_trace
from haq.runtime.trace import split_by_sequence
from haq.sim import native_replay, timeline

pytestmark = pytest.mark.skipif(native_replay.library() is None, reason="no C compiler for the replay")


def _replays(policy_name: str, ctx_args: dict, steps, predictor, layers: int, **kwargs):
    """(C replay, Python replay) of fresh policies built alike."""
    out = []
    for native in (True, False):
        policy = make_policy(policy_name, PolicyContext(**ctx_args))
        assert native_replay.runs(policy)
        if not native:
            runs, native_replay.runs = native_replay.runs, lambda p: False
        try:
            out.append(timeline.run_policy(policy, steps, predictor, layers, **kwargs))
        finally:
            if not native:
                native_replay.runs = runs
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_c_replay_equals_the_python_timeline(seed: int) -> None:
    rng = np.random.default_rng(seed)
    L, E, K = int(rng.integers(2, 6)), int(rng.choice([4, 8, 16])), int(rng.integers(1, 3))
    popularity = rng.dirichlet(np.full(E, 0.5), size=L) * 100 + 1
    trace = generate_synthetic_trace(num_sequences=6, seq_len=24, popularity=popularity, top_k=K, seed=seed)
    profile, replayed = split_by_sequence(trace)
    hardware = load_profile(["rtx4090-pcie4", "rtx3060-pcie3", "laptop"][seed % 3])
    if seed % 2:
        hardware = dataclasses.replace(hardware, device_is_host=True)
    expert_bytes = int(rng.integers(1, 64)) * 2**20
    predictor = CostPredictor(hardware, expert_bytes, 3.0e8)
    stats = profile_statistics(profile)
    for prefill, batch in ((0, 1), (8, 1), (0, 3), (5, 2)):
        steps = timeline.replay_steps(replayed, prefill_tokens=prefill, decode_batch=batch)
        for budget_experts in (1, L, L * E // 3, L * E):  # under one expert: AllCpu, not these
            ctx = dict(budget_bytes=budget_experts * expert_bytes, expert_bytes=expert_bytes, predictor=predictor,
                       stats=stats)
            for name in ("lru", "fiddler"):
                for kwargs in ({}, {"nonexpert_bytes_per_layer": 3 * 2**20}, {"nonexpert_s_per_layer": 2.5e-4}):
                    c, py = _replays(name, ctx, steps, predictor, L, **kwargs)
                    for field in dataclasses.fields(c):
                        a, b = getattr(c, field.name), getattr(py, field.name)
                        same = np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
                        assert same, (name, prefill, batch, budget_experts, kwargs, field.name, a, b)
