"""haq: W8A8 post-training quantization (adaptive smoothing + GPTQ) and a CPU-GPU MoE runtime.

Importing haq changes no global torch or transformers setting; submodules load lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"
