"""Reload a `haq export --format compressed-tensors` folder with transformers + compressed-tensors
(and llm-compressor's per-expert MoE loading for MoE checkpoints, as its docs describe for
checkpoints that store 2-D per-expert weights) and compare its logits with haq's own.
Runs in .peers/llmc. Writes {"max_abs_logit_diff", "ppl_reloaded", ...}."""
from __future__ import annotations

import argparse
import contextlib
import re
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


def local_name(name: str, model_type: str) -> str:
    """A checkpoint module name as the loaded model names it (Mixtral's block_sparse_moe is mlp in
    transformers 5; llm-compressor's per-expert linears are gate/up/down_proj)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    for ours, theirs in PER_EXPERT_RENAMES.get(model_type, {}).items():
        name = re.sub(rf"\.experts\.(\d+)\.{ours}(?=\.|$)", rf".experts.\1.{theirs}", name)
    return name


def load_transforms(model: torch.nn.Module, export: str, config) -> int:
    """Apply the export's `transform_config` (haq's online Hadamard input rotations) with
    compressed-tensors, as vLLM does, and load the stored +-1 matrices: one per order, which
    compressed-tensors shares among every target of that order (its own checkpoints store it once
    too, the other targets tied); transformers 5.17 does not pass the transform config on.
    Returns the number of transformed modules."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file

    raw = (config.quantization_config or {}).get("transform_config") or {}
    if not raw.get("config_groups"):
        return 0
    for group in raw["config_groups"].values():
        for args in group["apply"]:
            args["targets"] = [local_name(t, config.model_type) for t in args["targets"]]
    apply_transform_config(model, TransformConfig.model_validate(raw))
    stored = {k: v for k, v in load_file(f"{export}/model.safetensors").items() if "_input.weight" in k}
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, value in stored.items():
        ours = local_name(key, config.model_type)
        if ours not in params:
            raise SystemExit(f"stored transform {key} has no module after apply_transform_config")
        params[ours].data.copy_(value.to(params[ours].dtype))  # the shared matrix of its order
    return sum(1 for name, _ in model.named_modules() if name.endswith("_input") and "online_input" in name)


def int8_kernel(module: torch.nn.Module):
    """The forward vLLM's int8 W8A8 kernels compute, on the int8 weight and scale that
    compressed-tensors loaded (captured before its first forward decompresses them): dynamic
    per-token scale absmax / 127, levels clamped to [-128, 127], an exact integer GEMM (float64
    here), then rescaling in float32. compressed-tensors' own CPU forward instead fake-quantizes activations
    with scale absmax / 127.5, so it differs from both vLLM and haq by one activation rounding."""
    qweight, w_scale = module.weight.detach().clone(), module.weight_scale.detach().float().clone()
    bias = None if module.bias is None else module.bias.detach().clone()
    if qweight.dtype != torch.int8:
        raise SystemExit(f"expected an int8 weight still compressed after loading, got {qweight.dtype}")

    def forward(x: torch.Tensor) -> torch.Tensor:
        x_scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp(min=1e-8)
        xq = torch.round(x.float() / x_scale).clamp(-128, 127)
        acc = (xq.double() @ qweight.double().t()).float()  # exact integers (|sum| < 2^53)
        y = acc * x_scale * w_scale.reshape(1, -1)
        return (y if bias is None else y + bias.float()).to(x.dtype)

    return forward


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
    transformed = load_transforms(model, args.export, config)
    reference = torch.load(args.reference)["logits"]
    quantized = {name: m for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    kernels = {name: int8_kernel(m) for name, m in quantized.items()}
    window = windows["eval"][:1]

    def compare(tag: str) -> dict:
        with torch.no_grad():
            logits = model(window, use_cache=False).logits[0].float()
        diff = (logits - reference).abs()
        return {f"max_abs_logit_diff{tag}": float(diff.max()), f"mean_abs_logit_diff{tag}": float(diff.mean()),
                f"argmax_agreement{tag}": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())}

    row = {"model_class": type(model).__name__, "quantized_modules": len(quantized), "transformed_modules": transformed,
           "max_abs_logit": float(reference.abs().max()), **compare("_ct")}
    row["ppl_reloaded_ct"] = perplexity(model, windows["eval"])["ppl"]  # compressed-tensors' own forward
    for name, module in quantized.items():
        module.forward = kernels[name]
    row.update(compare(""))
    row["ppl_reloaded"] = perplexity(model, windows["eval"])["ppl"]  # int8-kernel semantics (vLLM, haq)
    write_result(args.result, row)


if __name__ == "__main__":
    main()
