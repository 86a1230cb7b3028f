"""Shared fixtures: tiny models built in seconds, the real zoo models built once per cache."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():  # the Triton kernels run (and are tested) on the CPU in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Build a tiny random model of a given zoo config into a temp folder (no tokenizer)."""
    from haq.zoo.tiny_random import build_tiny

    built = {}

    def make(name: str):
        if name not in built:
            out = tmp_path_factory.mktemp(name) / name
            build_tiny(name, out)
            built[name] = out
        return built[name]

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M built from its GGUF into the haq cache (once; ~1.5 min)."""
    from haq import zoo

    return zoo.build("smollm2-135m")


@pytest.fixture
def interrupt_second_layer(monkeypatch):
    """`arm()`: from then on the quantizer stops (KeyboardInterrupt) the first time it reaches
    decoder layer 1; the list it returns records the index of every layer quantized after."""
    from haq.quant import pipeline

    def arm() -> list[int]:
        real, calls = pipeline.quantize_layer, []

        def crash_on_second_layer(layer, spec, stats, recipe, report, prefix, probe):
            calls.append(report.index)
            if report.index == 1 and calls.count(1) == 1:
                raise KeyboardInterrupt
            return real(layer, spec, stats, recipe, report, prefix, probe)

        monkeypatch.setattr(pipeline, "quantize_layer", crash_on_second_layer)
        return calls

    return arm
