"""Runtime policy objects: trace format, synthetic traces, hardware profiles, cache, predictor, placement."""
from __future__ import annotations

import dataclasses
import json
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haq.errors import HaqError
from haq.runtime.cache import CacheStats, ExpertCache, PerLayerLRU
from haq.runtime.hardware import list_presets, load_profile, profile_from_dict
from haq.runtime.placement import (
    Paths,
    consecutive_overlap,
    expert_frequencies,
    global_popularity_placement,
    locality_excess,
    path_statistics,
    per_layer_frequency_placement,
    ranking_from_frequencies,
    two_stage_placement,
    uniform_placement,
)
from haq.runtime.predictor import CostPredictor
from haq.runtime.synthetic import (
    MIXTRAL_EXPERT_BYTES,
    MIXTRAL_EXPERT_FLOPS,
    generate_synthetic_trace,
    load_fiddler_ranking,
    load_mixtral_popularity,
    target_inclusion,
)
from haq.runtime.trace import Trace, TraceMeta, load_trace, save_trace, split_by_sequence

MiB = 2**20


# ---------------------------------------------------------------- cache

def test_lru_evicts_least_recently_used_and_counts():
    cache = ExpertCache(3 * MiB)
    for e in range(3):
        assert cache.admit((0, e), MiB) == []
    assert cache.lookup((0, 0))  # (0, 1) is now least recently used
    assert not cache.lookup((5, 5))
    assert cache.admit((0, 3), MiB) == [(0, 1)]
    assert cache.lru_keys() == [(0, 2), (0, 0), (0, 3)]
    assert cache.admit((0, 4), 2 * MiB) == [(0, 2), (0, 0)]
    assert cache.stats == CacheStats(hits=1, misses=1, evictions=3, admissions=5, refused=0)
    assert cache.used_bytes == 3 * MiB


def test_pinned_entries_stay_and_oversize_is_refused():
    cache = ExpertCache(4 * MiB, pinned={(1, 0): MiB, (1, 1): MiB})
    cache.admit((2, 0), MiB)
    cache.admit((2, 1), MiB)
    assert cache.admit((2, 2), MiB) == [(2, 0)]  # the pinned keys are never victims
    assert (1, 0) in cache and (1, 1) in cache
    assert cache.admit((3, 0), 3 * MiB) == []  # more than budget - pinned: refused, nothing evicted
    assert (3, 0) not in cache and (2, 1) in cache and (2, 2) in cache
    assert cache.stats.refused == 1
    assert cache.lookup((1, 1)) and cache.stats.hits == 1


def test_pinned_over_budget_names_the_setting():
    with pytest.raises(HaqError, match="--gpu-budget"):
        ExpertCache(MiB, pinned={(0, 0): MiB, (0, 1): MiB}, budget_setting="--gpu-budget")


def test_per_layer_lru_keeps_layers_apart():
    cache = PerLayerLRU.from_budget(4 * MiB, layers=2, expert_bytes=MiB)  # 2 slots per layer
    assert cache.slots == 2
    cache.admit((0, 0), MiB)
    cache.admit((1, 0), MiB)
    cache.admit((1, 1), MiB)
    assert cache.admit((1, 2), MiB) == [(1, 0)]  # layer 1 churns, layer 0 keeps its expert
    assert (0, 0) in cache
    assert cache.lookup((0, 0)) and not cache.lookup((0, 1))
    assert cache.stats.hits == 1 and cache.stats.misses == 1 and cache.stats.evictions == 1


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 5), st.integers(1, 6)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(budget=st.integers(0, 20), pinned=st.dictionaries(st.tuples(st.integers(0, 3), st.integers(0, 5)),
                                                         st.integers(1, 4), max_size=4), ops=ops)
def test_budget_never_exceeded(budget, pinned, ops):
    if sum(pinned.values()) > budget:
        with pytest.raises(HaqError):
            ExpertCache(budget, pinned)
        return
    cache = ExpertCache(budget, pinned)
    lookups = 0
    for is_lookup, layer, expert, size in ops:
        key = (layer, expert)
        if is_lookup:
            cache.lookup(key)
            lookups += 1
        else:
            evicted = cache.admit(key, size)
            assert not set(evicted) & set(pinned)
            assert all(k not in cache for k in evicted)
        assert 0 <= cache.used_bytes <= budget
        assert all(k in cache for k in pinned)
    assert cache.stats.hits + cache.stats.misses == lookups


# ---------------------------------------------------------------- hardware

def test_presets_load_with_sources():
    assert {"rtx4090-pcie4", "rtx3060-pcie3", "laptop"} <= set(list_presets())
    for name in list_presets():
        prof = load_profile(name)
        for q in (prof.cpu.mem_bw, prof.cpu.int8_ops, prof.cpu.overhead, prof.device.mem_bw, prof.device.int8_ops,
                  prof.device.overhead, prof.link.bw, prof.link.latency, prof.host_memory_bw, prof.device_memory):
            assert q.value > 0 and len(q.source) > 10


def test_expert_times_scale_with_expert_shape():
    prof = load_profile("rtx4090-pcie4")
    big = prof.expert_times(MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS)
    small = prof.expert_times(2 * MiB)
    assert small.cpu(1) < big.cpu(1) and small.transfer < big.transfer and small.device(1) < big.device(1)
    assert 6e-3 < big.transfer < 8e-3  # ~168 MiB over ~25 GB/s
    assert big.cpu(16) > big.cpu(1)


def test_profile_json_round_trip_and_rejects_bad_keys(tmp_path):
    prof = load_profile("laptop")
    path = tmp_path / "hw.json"
    prof.save(path)
    assert load_profile(path) == prof
    data = json.loads(path.read_text())
    data["cpu"]["mem_bandwidth"] = data["cpu"].pop("mem_bw")
    with pytest.raises(HaqError, match="unknown key.*mem_bandwidth"):
        profile_from_dict(data)
    data = json.loads(path.read_text())
    data["link"]["bw"]["value"] = -1
    with pytest.raises(HaqError, match="link.bw.value"):
        profile_from_dict(data)
    with pytest.raises(HaqError, match="unknown hardware preset or file"):
        load_profile("rtx9090")
    data = json.loads(path.read_text())
    assert data.pop("device_is_host") is False and profile_from_dict(data) == prof  # optional key
    with pytest.raises(HaqError, match="device_is_host"):
        profile_from_dict({**data, "device_is_host": "yes"})


# ---------------------------------------------------------------- predictor

def test_a_device_that_is_the_host_never_gets_copies():
    """CPU-only: the "device" is the same cores, so copying weights there only costs time."""
    host = dataclasses.replace(load_profile("laptop"), device_is_host=True)
    host = dataclasses.replace(host, device=host.cpu)
    predictor = CostPredictor(host, 2 * MiB)
    for n in (1, 16, 512):
        d = predictor.decide(n, resident=False, expected_reuse=1e9)
        assert d.where == "cpu" and not d.transfer
    assert predictor.decide(1, resident=True).where == "device"  # a resident copy is as good as the CPU

@pytest.fixture(scope="module")
def mixtral_predictor():
    return CostPredictor(load_profile("rtx4090-pcie4"), MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS)


def test_decode_goes_to_cpu_prefill_to_copy(mixtral_predictor):
    p = mixtral_predictor
    decode = p.decide(1, resident=False)
    assert decode.where == "cpu" and not decode.transfer
    prefill = p.decide(512, resident=False, expected_reuse=1.0)
    assert prefill.where == "device" and prefill.transfer and prefill.admit
    assert p.t_transfer() + p.t_device(512) < p.t_cpu(512)
    assert not p.decide(512, resident=False, expected_reuse=-1.0).admit  # worth less than its victim
    assert p.decide(1, resident=True) .where == "device"


def test_background_copy_needs_reuse_and_an_idle_link(mixtral_predictor):
    p = mixtral_predictor
    assert 0 < p.break_even_reuse < 2
    d = p.decide(1, resident=False, expected_reuse=p.break_even_reuse + 1)
    assert d.where == "cpu" and d.transfer and d.admit
    assert not p.decide(1, resident=False, expected_reuse=p.break_even_reuse / 2).transfer
    busy = p.decide(1, resident=False, expected_reuse=10.0, link_backlog_s=10 * p.t_transfer())
    assert busy.where == "cpu" and not busy.transfer


def test_cpu_backlog_and_copies_in_flight(mixtral_predictor):
    p = mixtral_predictor
    # the CPU already has 3 calls queued in this layer: copying is faster
    assert p.decide(1, resident=False, cpu_backlog_s=3 * p.t_cpu(1)).where == "device"
    # resident, but its copy lands in 1 s: the CPU is faster
    assert p.decide(1, resident=True, ready_in_s=1.0).where == "cpu"
    assert p.decide(1, resident=True, ready_in_s=1e-5).where == "device"


# ---------------------------------------------------------------- traces

def _small_trace(weights: bool = True) -> Trace:
    rng = np.random.default_rng(0)
    T, L, K, E = 12, 3, 2, 4
    experts = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    experts[5, 1, 1] = -1
    return Trace(
        experts=experts,
        seq_id=np.repeat(np.arange(3, dtype=np.int32), 4),
        pos=np.tile(np.arange(4, dtype=np.int32), 3),
        meta=TraceMeta(model="toy", num_experts=E, layers=L, top_k=K, source="test", extra={"note": "x"}),
        weights=np.full((T, L, K), 0.5, dtype=np.float16) if weights else None,
    )


@pytest.mark.parametrize("weights", [True, False])
def test_trace_round_trip(tmp_path, weights):
    trace = _small_trace(weights)
    path = tmp_path / "t.npz"
    save_trace(path, trace)
    back = load_trace(path)
    np.testing.assert_array_equal(back.experts, trace.experts)
    np.testing.assert_array_equal(back.seq_id, trace.seq_id)
    np.testing.assert_array_equal(back.pos, trace.pos)
    assert back.meta == trace.meta
    assert (back.weights is None) == (not weights)
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temp file left behind


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _arrays(trace: Trace) -> dict:
    return {"experts": trace.experts, "seq_id": trace.seq_id, "pos": trace.pos,
            "meta": np.array(trace.meta.to_json())}


def _meta(**change) -> np.ndarray:
    meta = json.loads(_small_trace().meta.to_json())
    meta.update(change)
    return np.array(json.dumps({k: v for k, v in meta.items() if v is not None}))


BAD = {
    "missing array": (lambda a: a.pop("pos"), "missing array"),
    "experts dtype": (lambda a: a.update(experts=a["experts"].astype(np.int32)), "experts must be int16"),
    "seq_id shape": (lambda a: a.update(seq_id=a["seq_id"][:-1]), "seq_id must be int32"),
    "expert id range": (lambda a: a["experts"].__setitem__((2, 0, 0), 4), "outside"),
    "bad json": (lambda a: a.update(meta=np.array("{not json")), "not valid JSON"),
    "meta key": (lambda a: a.update(meta=_meta(top_k=None)), "meta lacks"),
    "meta layers": (lambda a: a.update(meta=_meta(layers=5)), "disagrees with meta"),
    "duplicate expert": (lambda a: a["experts"].__setitem__((0, 0), [1, 1]), "same expert twice"),
    "split sequence": (lambda a: a.update(seq_id=np.array([0, 0, 1, 1, 0, 0, 2, 2, 2, 2, 1, 1], np.int32)),
                       "contiguous"),
    "pos order": (lambda a: a.update(pos=a["pos"][::-1].copy()), "pos must strictly increase"),
    "weights dtype": (lambda a: a.update(weights=np.zeros(a["experts"].shape, np.float32)), "weights must be float16"),
    "unexpected": (lambda a: a.update(extra=np.zeros(3)), "unexpected array"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_trace_raises(tmp_path, case):
    arrays = _arrays(_small_trace())
    mutate, message = BAD[case]
    mutate(arrays)
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(HaqError, match=message) as info:
        load_trace(path)
    assert str(path) in str(info.value)


def test_unreadable_or_missing_trace(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(HaqError, match="junk.npz.*not a readable"):
        load_trace(junk)
    with pytest.raises(HaqError, match="no such file"):
        load_trace(tmp_path / "absent.npz")


def test_split_by_sequence():
    trace = _small_trace()
    prof, ev = split_by_sequence(trace, 0.5)
    assert prof.sequences() == [0, 1] and ev.sequences() == [2]
    assert prof.num_tokens + ev.num_tokens == trace.num_tokens
    one = trace.select_sequences([0])
    with pytest.raises(HaqError, match="needs >= 2"):
        split_by_sequence(one)


# ---------------------------------------------------------------- synthetic traces

@pytest.fixture(scope="module")
def mixtral_trace():
    return generate_synthetic_trace(8, 128, seed=3)


def test_real_mixtral_data_ships_with_the_package():
    pop = load_mixtral_popularity()
    assert pop.shape == (32, 8)
    assert np.allclose(pop.sum(axis=1), pop.sum(axis=1)[0])  # every layer: 2 x tokens selections
    ranking = load_fiddler_ranking()
    assert len(ranking) == 256 and len(set(ranking)) == 256 and ranking[0] == (9, 5)
    with pytest.raises(HaqError, match="unknown MMLU subject"):
        load_mixtral_popularity(subjects=["astrology"])


def test_synthetic_trace_matches_mixtral_popularity(mixtral_trace, tmp_path):
    tr = mixtral_trace
    assert tr.experts.shape == (1024, 32, 2) and tr.meta.source.startswith("synthetic")
    q_hat = expert_frequencies(tr) / tr.num_tokens
    q = target_inclusion(load_mixtral_popularity(), 1.0, 2)
    assert np.abs(q_hat - q).mean() < 0.03
    overlap = consecutive_overlap(tr).mean()
    assert 0.5 < overlap < 0.62  # the Mixtral paper's range; 0.46 for random top-2 of 8
    save_trace(tmp_path / "m.npz", tr)
    assert load_trace(tmp_path / "m.npz").meta.extra["synthetic"]["seed"] == 3


def test_synthetic_knobs():
    flat = generate_synthetic_trace(4, 64, skew=0.0, token_locality=0.0, seed=1)
    sticky = generate_synthetic_trace(4, 64, skew=0.0, token_locality=0.9, seed=1)
    assert consecutive_overlap(sticky).mean() > consecutive_overlap(flat).mean() + 0.2
    assert locality_excess(sticky)[-1].mean() > 1.0 > abs(locality_excess(flat)[-1].mean())
    sharp = target_inclusion(load_mixtral_popularity(), 3.0, 2)
    assert sharp.max() <= 1.0 + 1e-9 and np.allclose(sharp.sum(axis=1), 2.0)
    with pytest.raises(HaqError, match="token_locality"):
        generate_synthetic_trace(1, 4, token_locality=1.0)


# ---------------------------------------------------------------- placement

def test_placements_respect_budget(mixtral_trace):
    freq = expert_frequencies(mixtral_trace)
    paths = path_statistics(mixtral_trace, window=2)
    for budget in (0, 1, 31, 64, 200, 256, 300):
        expect = min(budget, 256)
        assert len(two_stage_placement(freq, paths, budget, path_share=0.5)) == expect
        assert len(two_stage_placement(freq, paths, budget)) == expect
        assert len(uniform_placement(32, 8, budget)) == expect
        assert len(global_popularity_placement(ranking_from_frequencies(freq), budget)) == expect
        assert len(per_layer_frequency_placement(freq, budget)) == expect
    assert uniform_placement(2, 4, 5) == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}


def test_stage_two_balances_layers():
    # layer 0 is skewed, layer 1 flat: global popularity spends everything on layer 0
    freq = np.array([[100.0, 90, 80, 70], [30, 30, 30, 30]])
    empty = Paths(window=1, start=np.zeros(0, np.int64), experts=np.zeros((0, 1, 4), np.int16), counts=np.zeros(0))
    share = freq / freq.sum(axis=1, keepdims=True)

    def covered(placed):
        return np.array([sum(share[layer, e] for (l, e) in placed if l == layer) for layer in range(2)])

    glob = covered(global_popularity_placement(ranking_from_frequencies(freq), 4))
    bal = covered(two_stage_placement(freq, empty, 4))
    assert glob.tolist() == [1.0, 0.0]
    assert np.ptp(bal) < np.ptp(glob) and bal.min() >= 0.5


def test_stage_one_covers_frequent_paths():
    T, L, E = 60, 3, 6
    rng = np.random.default_rng(1)
    experts = np.stack([np.stack([rng.permutation(E)[:2] for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    experts[:30] = np.array([[0, 1], [2, 3], [4, 5]], dtype=np.int16)  # one dominant path
    trace = Trace(experts, np.zeros(T, np.int32), np.arange(T, dtype=np.int32),
                  TraceMeta("toy", E, L, 2, "test"))
    freq = np.ones((L, E))  # flat frequencies: only the path statistics can find the path
    placed = two_stage_placement(freq, path_statistics(trace, window=3), 6, path_share=1.0)
    assert placed == {(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)}


def test_profile_fit_is_exact_at_one_token_and_recovers_a_line():
    from haq.runtime.profile_hw import _fit

    ns = [1, 2, 4, 8, 16, 32, 64, 128]
    a, b = _fit(ns, [3e-3 + 2e-5 * n for n in ns])
    assert a == pytest.approx(3e-3) and b == pytest.approx(2e-5)
    flat_then_linear = [1e-3 if n <= 16 else 1e-3 + 1e-5 * (n - 16) for n in ns]
    a, b = _fit(ns, flat_then_linear)
    assert a + b == pytest.approx(1e-3)  # the decode time is the measured one
