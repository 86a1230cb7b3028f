"""Prefetch: the predictors (profile paths, recorded pre-gates), the policy's budget under prefetch,
the simulator's lookahead, and the engine's pre-gating (same tokens, the budget held)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from haq.errors import HaqError
from haq.runtime.hardware import Quantity, load_profile
from haq.runtime.placement import profile_statistics
from haq.runtime.haq_policy import Haq
from haq.runtime.policies import PolicyContext
from haq.runtime.predictor import CostPredictor
from haq.runtime.sampling import SamplingParams
from haq.runtime.prefetch import (PathPredictor, path_accuracy, pregate_accuracy, pregate_probabilities,
                                  pregate_rates, prediction_accuracy)
from haq.runtime.synthetic import MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS, generate_synthetic_trace
from haq.runtime.trace import Trace, TraceMeta, load_trace, save_trace, split_by_sequence
from haq.sim.lookahead import lookahead_for, oracle_lookahead
from haq.sim.timeline import replay_steps, run_policy, summarize


def _trace(experts: np.ndarray, E: int, pregate: np.ndarray | None = None, distance: int | None = None) -> Trace:
    T, L, K = experts.shape
    meta = TraceMeta("toy", E, L, K, "test", extra={} if distance is None else {"pregate_distance": distance})
    seq = np.repeat(np.arange(4, dtype=np.int32), T // 4)
    return Trace(experts.astype(np.int16), seq, np.tile(np.arange(T // 4, dtype=np.int32), 4), meta,
                 pregate=None if pregate is None else pregate.astype(np.int16))


def test_path_predictor_learns_a_deterministic_path():
    """Layer 2's expert is a function of layer 0's (distance 2): predicted with probability -> 1,
    and the probabilities of a layer sum to top_k."""
    rng = np.random.default_rng(0)
    first = rng.integers(0, 4, 400)
    experts = np.stack([first, rng.integers(0, 4, 400), (first + 1) % 4], axis=1)[:, :, None]  # [T, 3, 1]
    trace = _trace(experts, 4)
    predictor = PathPredictor.from_trace(trace, distance=2)
    for e in range(4):
        probs = predictor.predict(0, [e])
        assert probs.argmax() == (e + 1) % 4 and probs.max() > 0.95
        assert probs.sum() == pytest.approx(1.0, abs=0.02)
    assert path_accuracy(predictor, trace)[2] == 1.0
    np.testing.assert_allclose(predictor.predict(0, []), predictor.marginal[2])  # no evidence: layer 2's marginal
    with pytest.raises(HaqError, match="layer"):
        predictor.predict(1, [0])
    with pytest.raises(HaqError, match="distance"):
        PathPredictor.from_trace(trace, distance=3)


def test_batched_path_predictions_equal_the_per_layer_ones_bit_for_bit():
    """The replay's batched `predict_paths` is `predict` per token and layer, to the last bit, with
    missing experts (-1) and a token with no expert at a layer."""
    popularity = np.random.default_rng(5).dirichlet(np.ones(16), size=6) * 100 + 1  # [6 layers, 16 experts]
    trace = generate_synthetic_trace(4, 80, popularity=popularity, top_k=3, seed=5)
    profile, replayed = split_by_sequence(trace)
    predictor = PathPredictor.from_trace(profile, distance=2)
    experts = replayed.experts[:40].astype(np.int64)
    experts[3, 1, 0] = -1
    experts[7, 2, :] = -1
    batched = predictor.predict_paths(experts)
    for token, rows in zip(experts.tolist(), batched):
        sets = [[e for e in row if e >= 0] for row in token]
        expected = np.stack([predictor.predict(layer, sets[layer], sets[layer - 1] if layer else [])
                             for layer in range(6 - 2)])
        np.testing.assert_array_equal(rows, expected)


def test_path_prediction_beats_the_marginal_when_layers_share_a_latent():
    trace = generate_synthetic_trace(8, 64, seed=3, layer_locality=0.9)
    profile, replayed = split_by_sequence(trace)
    predictor = PathPredictor.from_trace(profile, distance=1)
    acc = path_accuracy(predictor, replayed)[1:].mean()
    marginal = np.mean([prediction_accuracy(np.tile(predictor.marginal[layer], (replayed.num_tokens, 1)),
                                            replayed.experts[:, layer], 2) for layer in range(1, 32)])
    assert acc > marginal + 0.1


def test_pregate_probabilities_and_accuracy():
    probs = pregate_probabilities([1, 3], 0.75, 8, 2)
    assert probs[1] == probs[3] == 0.75 and probs.sum() == pytest.approx(2.0)
    hit, miss = pregate_rates(0.75, 8, 2)  # one token: its top-2 and the 6 others still hold 2 calls
    assert (hit, miss) == (0.75, pytest.approx(0.5 / 6)) and 2 * hit + 6 * miss == pytest.approx(2.0)
    experts = np.array([[[0, 1], [2, 3]], [[0, 1], [4, 5]]] * 2)  # [4 tokens, 2 layers, 2]
    pregate = np.array([[[-1, -1], [2, 6]], [[-1, -1], [4, 5]]] * 2)
    acc = pregate_accuracy(_trace(experts, 8, pregate, distance=1))
    assert acc[0] == 0.0 and acc[1] == 0.75
    with pytest.raises(HaqError, match="pregate_distance"):
        pregate_accuracy(_trace(experts, 8, pregate))
    with pytest.raises(HaqError, match="no pre-gate"):
        pregate_accuracy(_trace(experts, 8))


def test_trace_keeps_pregate_and_rejects_a_bad_one(tmp_path):
    experts = np.array([[[0, 1], [2, 3]]] * 4)
    trace = _trace(experts, 8, np.array([[[-1, -1], [2, 6]]] * 4), distance=1)
    save_trace(tmp_path / "t.npz", trace)
    back = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.pregate, trace.pregate)
    assert back.meta.extra["pregate_distance"] == 1
    for bad in (np.array([[[-1, -1], [2, 9]]] * 4), np.zeros((4, 2, 3))):
        with pytest.raises(HaqError, match="pregate|pre-gate"):
            save_trace(tmp_path / "bad.npz", _trace(experts, 8, bad, distance=1))


def test_recorded_pregate_is_the_later_router_on_the_earlier_input(tiny_dir):
    from transformers import AutoModelForCausalLM

    from haq.runtime.record import record_trace

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-qwen3-moe")).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    trace = record_trace(model, ids, "tiny", progress=False, pregate_distance=1)
    assert trace.meta.extra["pregate_distance"] == 1 and (trace.pregate[:, 0] == -1).all()
    inputs = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for window in ids:
            model(window[None], use_cache=False)
    handle.remove()
    with torch.no_grad():
        expected = torch.cat([model.model.layers[1].mlp.gate(x)[2] for x in inputs]).numpy()
    np.testing.assert_array_equal(trace.pregate[:, 1], expected)


@pytest.fixture(scope="module")
def mixtral_ctx():
    trace = generate_synthetic_trace(4, 32, seed=0)
    predictor = CostPredictor(load_profile("rtx4090-pcie4"), MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS)
    return trace, profile_statistics(trace), predictor


class _Idle:
    def link_backlog_s(self) -> float:
        return 0.0

    def cpu_backlog_s(self) -> float:
        return 0.0

    def ready_in_s(self, key) -> float:
        return 0.0

    def copied_ahead(self, key) -> bool:
        return False


class _Ahead(_Idle):
    """Every key's copy is in a staging buffer (`Policy.prefill_ahead`) and has landed."""

    def copied_ahead(self, key) -> bool:
        return True


ops = st.lists(st.tuples(st.sampled_from(["call", "prefetch", "ahead"]), st.integers(0, 31),
                         st.lists(st.floats(0, 1), min_size=8, max_size=8)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 40), pin_share=st.sampled_from([0.0, 0.25, 0.5]), ops=ops)
def test_budget_never_exceeded_with_prefetch(mixtral_ctx, slots, pin_share, ops):
    """Any mix of calls, prefetches and prefill copies started a layer ahead (any probabilities,
    any tokens, an idle link): the resident bytes stay within the budget, pinned experts stay,
    what a prefetch returns is resident, and a call on a copy ahead is never a cache hit."""
    _, stats, predictor = mixtral_ctx
    ctx = PolicyContext(budget_bytes=slots * MIXTRAL_EXPERT_BYTES, expert_bytes=MIXTRAL_EXPERT_BYTES,
                        predictor=predictor, stats=stats, pin_share=pin_share)
    policy = Haq(ctx)
    pinned = set(policy.cache.pinned)
    for kind, layer, probs in ops:
        if kind == "call":
            policy.decide((layer, int(np.argmax(probs))), 1, _Idle())
        elif kind == "ahead":
            tokens = 2 + int(1000 * probs[0])
            for key in policy.prefill_ahead(layer, tokens, _Idle(), lead_s=10 * predictor.t_transfer()):
                assert key not in policy.cache
                d = policy.decide(key, max(1, int(tokens * probs[1])), _Ahead())
                assert d.ahead == (d.where == "device") and not d.transfer
                assert (key in policy.cache) == d.admit and not set(d.evicted) & pinned
        else:
            for pf in policy.prefetch(layer, np.array(probs), _Idle(), lead_s=1.0):
                assert pf.key in policy.cache and not set(pf.evicted) & pinned
        assert policy.resident_bytes() <= ctx.budget_bytes
        assert pinned <= {k for k in pinned if k in policy.cache}


def test_no_prefetch_into_a_busy_link_or_without_an_lru_part(mixtral_ctx):
    _, stats, predictor = mixtral_ctx
    ctx = PolicyContext(budget_bytes=32 * MIXTRAL_EXPERT_BYTES, expert_bytes=MIXTRAL_EXPERT_BYTES,
                        predictor=predictor, stats=stats, pin_share=0.5)
    certain = np.ones(8)
    assert not Haq(ctx).prefetch(3, certain, _Idle(), lead_s=0.5 * predictor.t_transfer())  # lands too late
    assert Haq(ctx).prefetch(3, certain, _Idle(), lead_s=2 * predictor.t_transfer())
    assert not Haq(dataclasses.replace(ctx, pin_share=1.0)).prefetch(3, certain, _Idle(), 1.0)
    assert not Haq(dataclasses.replace(ctx, prefetch=False)).prefetch(3, certain, _Idle(), 1.0)


def test_simulated_prefetch_with_an_oracle_is_used_and_within_budget(mixtral_ctx):
    trace, stats, predictor = mixtral_ctx
    ctx = PolicyContext(budget_bytes=64 * MIXTRAL_EXPERT_BYTES, expert_bytes=MIXTRAL_EXPERT_BYTES,
                        predictor=predictor, stats=stats, pin_share=0.25)
    steps = replay_steps(trace)
    policy = Haq(ctx)
    replay = run_policy(policy, steps, predictor, 32, lookahead=oracle_lookahead(8, 2))
    plain = run_policy(Haq(ctx), steps, predictor, 32)
    assert replay.prefetches > 0 and replay.prefetch_hits / replay.prefetches > 0.5
    resident = {(layer, e) for layer in range(32) for e in range(8) if (layer, e) in policy.cache}
    assert set(zip(*np.nonzero(policy.resident))) == resident  # the prefetch's array mirrors the cache
    assert replay.peak_resident_bytes <= ctx.budget_bytes
    assert replay.hits_per_layer.sum() > plain.hits_per_layer.sum()
    assert plain.prefetches == 0


def test_prefill_copies_ahead_are_the_absent_experts_the_layer_would_copy(mixtral_ctx):
    """Only absent experts with a token expected, the busiest first, no more than the idle link
    lands before the layer; none for one token, a busy link, pipelining off, or when the device is
    the host."""
    _, stats, predictor = mixtral_ctx
    ctx = PolicyContext(budget_bytes=64 * MIXTRAL_EXPERT_BYTES, expert_bytes=MIXTRAL_EXPERT_BYTES,
                        predictor=predictor, stats=stats, pin_share=1.0)
    policy = Haq(ctx)
    keys = policy.prefill_ahead(5, 512, _Idle(), lead_s=0.05)
    expected = 512 * policy.p_rows[5]
    assert keys and all(not policy.resident[k] and k[0] == 5 for k in keys)
    assert [expected[e] for _, e in keys] == sorted((expected[e] for _, e in keys), reverse=True)
    assert 1 < len(keys) <= 0.05 // predictor.t_transfer()
    assert not policy.prefill_ahead(5, 1, _Idle(), lead_s=0.01)
    assert not policy.prefill_ahead(5, 512, _Idle(), lead_s=0.5 * predictor.t_transfer())
    assert not Haq(dataclasses.replace(ctx, pipeline=False)).prefill_ahead(5, 512, _Idle(), lead_s=0.01)
    host = CostPredictor(dataclasses.replace(load_profile("rtx4090-pcie4"), device_is_host=True),
                         MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS)
    assert not Haq(dataclasses.replace(ctx, predictor=host)).prefill_ahead(5, 512, _Idle(), lead_s=0.01)


def test_simulated_prefill_pipelining_is_faster_and_counts_its_buffers(mixtral_ctx):
    """Copies started a layer ahead land in the link's idle time before their calls: a shorter
    prefill over the same calls, the budget kept (those admitted from staging too), and their
    staging buffers in the device bytes."""
    trace, stats, predictor = mixtral_ctx
    ctx = PolicyContext(budget_bytes=64 * MIXTRAL_EXPERT_BYTES, expert_bytes=MIXTRAL_EXPERT_BYTES,
                        predictor=predictor, stats=stats, pin_share=0.5)
    steps = replay_steps(trace, prefill_tokens=16)
    ahead = run_policy(Haq(ctx), steps, predictor, 32)
    plain = run_policy(Haq(dataclasses.replace(ctx, pipeline=False)), steps, predictor, 32)
    prefill = np.array([st.prefill for st in steps])
    assert ahead.ahead_copies > 0 and ahead.ahead_peak >= 1 and plain.ahead_copies == plain.ahead_peak == 0
    assert ahead.step_latency[prefill].sum() < plain.step_latency[prefill].sum()
    assert (ahead.calls_per_layer == plain.calls_per_layer).all()
    assert ahead.peak_resident_bytes <= ctx.budget_bytes
    result = summarize("haq", ahead, steps, ctx.budget_bytes, 256 * MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_BYTES, 0,
                       predictor.times.profile)
    staging = int(ahead.staged) + ahead.ahead_peak
    assert result.device_bytes == ahead.peak_resident_bytes + staging * MIXTRAL_EXPERT_BYTES
    assert result.ahead_per_prefill_token == ahead.ahead_copies / sum(st.tokens for st in steps if st.prefill)


def test_lookahead_sources_and_their_errors(mixtral_ctx):
    trace = mixtral_ctx[0]
    assert lookahead_for("off", trace, trace) is None
    assert lookahead_for("auto", trace, trace).source == "path"  # no recorded pre-gate
    assert lookahead_for("oracle", trace, trace, distance=3).distance == 3
    with pytest.raises(HaqError, match="pre-gate"):
        lookahead_for("pregate", trace, trace)
    with pytest.raises(HaqError, match="unknown prefetch source"):
        lookahead_for("psychic", trace, trace)


def _tiny_engine_setup(tiny_dir, prompt_len: int, new_tokens: int):
    """tiny-qwen3-moe, its routing profile, a prompt, the plain model's greedy tokens, a quarter of
    its expert bytes, and the 4090 preset with a slow CPU dispatch (so that device copies of these
    tiny experts pay)."""
    from transformers import AutoModelForCausalLM

    from haq.runtime.record import record_trace

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-qwen3-moe")).eval()
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    profile = record_trace(model, ids, "tiny", progress=False)
    prompt = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = []
        context = prompt
        for _ in range(new_tokens):
            expected.append(int(model(context).logits[0, -1].argmax()))
            context = torch.cat([context, torch.tensor([[expected[-1]]])], dim=1)
    experts_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "experts" in n)
    hardware = load_profile("rtx4090-pcie4")
    hardware = dataclasses.replace(hardware, cpu=dataclasses.replace(hardware.cpu, overhead=Quantity(1e-3, "s", "test")))
    return model, profile, prompt, expected, experts_bytes // 4, hardware


def test_engine_prefetch_by_pregating_keeps_tokens_and_budget(tiny_dir):
    """An engine whose haq policy prefetches every pre-gated expert it can (value ignored): the
    same greedy tokens as the plain model, the budget held, the pre-gate scored and recorded."""
    from haq.api import build_engine

    class Eager(Haq):
        def prefetch_gain(self, layer, probs, horizon):
            return probs * 1e9

    model, profile, prompt, expected, budget, hardware = _tiny_engine_setup(tiny_dir, 10, 6)
    engine = build_engine(copy.deepcopy(model), budget_bytes=budget, hardware=hardware, policy="haq", profile=profile)
    engine.use_policy("haq", dataclasses.replace(engine.policy_ctx, pin_share=0.0))  # all of it LRU
    engine.policy = Eager(engine.policy_ctx)
    tokens, metrics = engine.generate(prompt, max_new_tokens=6)
    engine.close()
    assert tokens == expected
    assert metrics.prefetches > 0 and metrics.device_bytes["experts_peak"] <= engine.budget_bytes
    trace = engine.last_trace("tiny")
    accuracy = pregate_accuracy(trace)
    assert trace.meta.extra["pregate_distance"] == 1
    np.testing.assert_allclose(accuracy, metrics.pregate_accuracy)
    assert 0.0 < accuracy[1] <= 1.0


@pytest.mark.parametrize("pipeline", [True, False])
def test_engine_prefill_copies_a_layer_ahead_keeps_tokens_and_budget(tiny_dir, pipeline):
    """Prefill pipelined in the engine, by the policy code the simulator runs (`prefill_ahead`):
    copies of layer l+1's experts start during layer l, layer l+1 serves calls from them (device
    calls, not hits), the cache stays in budget with the staging buffers counted apart, and the
    tokens are the plain model's. Off, nothing is copied ahead."""
    from haq.api import build_engine

    model, profile, prompt, expected, budget, hardware = _tiny_engine_setup(tiny_dir, 48, 4)
    engine = build_engine(copy.deepcopy(model), budget_bytes=budget, hardware=hardware, policy="haq", profile=profile)
    engine.use_policy("haq", dataclasses.replace(engine.policy_ctx, pipeline=pipeline))
    served_ahead = []
    decide = engine.policy.decide

    def counting(key, n, view):
        d = decide(key, n, view)
        served_ahead.append(d.ahead)
        return d

    engine.policy.decide = counting
    asked = []  # the tokens of each forward the policy was asked to pipeline
    ahead = engine.policy.prefill_ahead
    engine.policy.prefill_ahead = lambda layer, tokens, view, lead: asked.append(tokens) or ahead(layer, tokens, view, lead)
    # the engine's first forward has no layer timed before its layer 0, this 2-layer model's only chance
    engine.generate(prompt, max_new_tokens=4)
    served_ahead.clear()
    tokens, metrics = engine.generate(prompt, max_new_tokens=4)
    assert tokens == expected
    staging = metrics.device_bytes["staging_peak"]  # copies ahead, and a copy made for one call and not kept
    assert metrics.device_bytes["experts_peak"] <= engine.budget_bytes
    if pipeline:
        assert metrics.copies_ahead > 0 and any(served_ahead)
        assert 0 < staging <= (metrics.copies_ahead + 1) * engine.expert_bytes
    else:
        assert metrics.copies_ahead == 0 and not any(served_ahead) and staging <= engine.expert_bytes
    asked.clear()
    engine.generate_batch([prompt[0].tolist(), prompt[0, :40].tolist()], SamplingParams(max_tokens=4))
    engine.close()
    assert set(asked) <= {48, 40}  # prefill forwards only, never a decode step of two rows
    assert not engine.ahead and not engine.ahead_next  # every staging buffer freed


def test_simulate_cli_prefetch_and_batch_flags(capsys):
    from haq.cli import build_parser, main
    from haq.sim.lookahead import PREFETCH_SOURCES

    simulate = next(a for a in build_parser()._subparsers._group_actions[0].choices["simulate"]._actions
                    if a.dest == "prefetch")
    assert tuple(simulate.choices) == PREFETCH_SOURCES
    assert main(["simulate", "synthetic-mixtral", "--decode-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("haq: error: --decode-batch must be >= 1") and err.count("\n") == 1
