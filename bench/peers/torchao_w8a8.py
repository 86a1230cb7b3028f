"""torchao W8A8: Int8DynamicActivationInt8WeightConfig (int8 per-channel weights, dynamic per-token
int8 activations, aten::_int_mm), no calibration. Fused 3-D experts are targeted explicitly by
parameter name and run with transformers' eager experts implementation (the default skips them:
quantize_ only swaps nn.Linear). lm_head and routers stay float, as in haq.
Runs in .peers/torchao (torchao 0.18.0)."""
from __future__ import annotations

import time
from collections import OrderedDict

import torch
from _common import load_windows, parser, perplexity, write_result

SKIP = ("lm_head", ".gate", "shared_expert_gate")  # high precision in every tool's recipe


def main() -> None:
    args = parser(__doc__).parse_args()
    from torchao.quantization import FqnToConfig, Int8DynamicActivationInt8WeightConfig, quantize_
    from transformers import AutoModelForCausalLM

    windows = load_windows(args.windows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    config = Int8DynamicActivationInt8WeightConfig()
    targets: OrderedDict = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith(SKIP):
            targets[name] = config
        for param in ("gate_up_proj", "down_proj"):  # fused experts [E, out, in]
            weight = getattr(module, param, None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() == 3:
                targets[f"{name}.{param}"] = config
    start = time.perf_counter()
    quantize_(model, FqnToConfig(targets), filter_fn=None)
    quant_s = time.perf_counter() - start
    experts = sum(1 for k in targets if k.endswith(("gate_up_proj", "down_proj")) and "experts" in k)
    result = perplexity(model, windows["eval"])
    write_result(args.result, {"tool": "torchao", "method": "int8 dynamic w8a8", "quant_s": round(quant_s, 1),
                               "quantized": len(targets), "fused_expert_params": experts, **result})


if __name__ == "__main__":
    main()
