"""Property tests over spaces of hostile inputs: budget strings, recipe dicts, hardware profiles
and trace arrays either parse into a valid value or raise HaqError; nothing else escapes."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haq.errors import HaqError

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@given(st.text(max_size=20) | st.from_regex(r"-?[0-9]{0,4}\.?[0-9]{0,3}\s*(%|[kKmMgG]i?[bB]|[bB]|TB)?", fullmatch=True))
def test_budget_strings_parse_or_fail_clearly(text):
    from haq.api import parse_budget

    try:
        value = parse_budget(text, 10**9)
    except HaqError:
        return
    assert isinstance(value, int) and value >= 0


@given(st.dictionaries(st.sampled_from(["method", "wbits", "abits", "act", "alpha", "alpha_step", "percdamp",
                                        "blocksize", "rotate", "search_tokens", "min_expert_tokens", "bogus"]),
                       JSON, max_size=5))
def test_recipe_dicts_build_or_fail_clearly(data):
    from haq.quant.recipe import Recipe

    try:
        recipe = Recipe.from_dict(data)
    except HaqError:
        return
    assert 2 <= recipe.wbits <= 8 and 0 <= recipe.alpha <= 1 and recipe.blocksize >= 1


def _profile() -> dict:
    from haq.runtime.hardware import load_profile

    return load_profile("rtx4090-pcie4").to_dict()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["link.bw.value", "cpu.mem_bw.value", "device.int8_ops.value", "link.latency.value",
                             "device_memory.value", "name", "cpu", "link.bw", "device_is_host", "model_costs"]),
       value=JSON)
def test_hardware_profiles_load_or_fail_clearly(path, value):
    from haq.runtime.hardware import profile_from_dict

    data = _profile()
    *head, last = path.split(".")
    node = data
    for key in head:
        node = node[key]
    node[last] = value
    try:
        profile = profile_from_dict(json.loads(json.dumps(data)))
    except HaqError:
        return
    times = profile.expert_times(10**6)
    assert all(np.isfinite([times.cpu(1), times.device(1), times.transfer]))


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    from haq.runtime.synthetic import generate_synthetic_trace
    from haq.runtime.trace import save_trace

    path = tmp_path_factory.mktemp("trace") / "t.npz"
    save_trace(path, generate_synthetic_trace(num_sequences=2, seq_len=8, seed=0))
    return path


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(key=st.sampled_from(["experts", "seq_id", "pos"]), dtype=st.sampled_from(["int64", "int8", "float32", "bool"]),
       shift=st.integers(-3, 3), drop=st.integers(0, 3))
def test_trace_arrays_load_or_fail_clearly(trace_file, tmp_path_factory, key, dtype, shift, drop):
    from haq.runtime.trace import load_trace

    with np.load(trace_file) as npz:
        arrays = {k: npz[k] for k in npz.files}
    bad = arrays[key].astype(dtype) + (shift if dtype != "bool" else 0)
    arrays[key] = bad[: len(bad) - drop] if drop else bad
    path = tmp_path_factory.mktemp("t") / "bad.npz"
    np.savez(path, **arrays)
    try:
        trace = load_trace(path)
    except HaqError:
        return
    assert trace.experts.min() >= 0 and trace.experts.max() < trace.meta.num_experts
