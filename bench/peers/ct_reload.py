"""Reload a `haq export --format compressed-tensors` folder with transformers + compressed-tensors
(and llm-compressor's per-expert MoE loading for MoE checkpoints, as its docs describe for
checkpoints that store 2-D per-expert weights) and compare its logits with haq's own.
Runs in .peers/llmc. Writes {"max_abs_logit_diff", "ppl_reloaded", ...}."""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from _common import load_windows, perplexity, write_result

# Mixtral checkpoints name an expert's gate / up / down linears w1 / w3 / w2 (what vLLM reads);
# transformers 5 has no 2-D load mapping for them, llm-compressor's linear experts use gate/up/down_proj.
PER_EXPERT_RENAMES = {"mixtral": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}}


def drop_unresolvable_aliases() -> None:
    """transformers 5.17's apply_patches() (used by llm-compressor's MoE loading) calls dir() on
    every imported transformers module; its legacy alias modules (image_processing_utils_fast)
    then import torchvision, which has no PyPI build for this CPU torch. Drop those aliases."""
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and getattr(module, "__file__", "") is None:
            try:
                dir(module)
            except ImportError:
                del sys.modules[name]


def moe_loading(model_type: str):
    """llm-compressor's context that loads per-expert checkpoints into per-expert Linears."""
    from llmcompressor.modeling.moe.conversion_mappings import ARCH_TO_IMPORT_PATHS
    from llmcompressor.utils import load_context

    if model_type not in ARCH_TO_IMPORT_PATHS:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if model_type in PER_EXPERT_RENAMES:
        from llmcompressor.modeling import patch_moe_mappings
        from transformers.core_model_loading import WeightRenaming

        renames = [WeightRenaming(source_patterns=rf"\.experts\.(\d+)\.{ours}\.", target_patterns=rf".experts.\1.{theirs}.")
                   for ours, theirs in PER_EXPERT_RENAMES[model_type].items()]
        stack.enter_context(patch_moe_mappings(model_type, renames,
                                               remove_targets=[".experts.gate_up_proj", ".experts.down_proj"]))
    stack.enter_context(load_context())
    drop_unresolvable_aliases()
    return stack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--export", required=True)
    p.add_argument("--windows", required=True)
    p.add_argument("--reference", required=True, help=".pt with haq's logits of the first eval window")
    p.add_argument("--result", required=True)
    args = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    windows = load_windows(args.windows)
    config = AutoConfig.from_pretrained(args.export)
    with moe_loading(config.model_type):
        model = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32).eval()
    reference = torch.load(args.reference)
    with torch.no_grad():
        logits = model(windows["eval"][:1], use_cache=False).logits[0].float()
    diff = (logits - reference["logits"]).abs()
    quantized = sum(1 for _, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
    result = perplexity(model, windows["eval"])
    write_result(args.result, {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                               "max_abs_logit": float(reference["logits"].abs().max()),
                               "argmax_agreement": float((logits.argmax(-1) == reference["logits"].argmax(-1))
                                                         .float().mean()),
                               "quantized_modules": quantized, "ppl_reloaded": result["ppl"],
                               "model_class": type(model).__name__})


if __name__ == "__main__":
    main()
