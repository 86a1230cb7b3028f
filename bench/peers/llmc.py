"""llm-compressor W8A8: SmoothQuant (strength 0.8) then GPTQ, int8 per-channel weights and dynamic
per-token activations, scored in this process (llm-compressor runs the result as simulated int8).
Runs in .peers/llmc (llmcompressor 0.14.0.1, compressed-tensors 0.19.0)."""
from __future__ import annotations

import time

import torch
from _common import load_windows, parser, perplexity, write_result


def recipe(model_type: str) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    # llm-compressor picks its own smoothing mappings for Llama and Mixtral (attention only for
    # MoE); OPT needs explicit ones.
    mappings = None
    if model_type == "opt":
        mappings = [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*self_attn_layer_norm"],
                    [["re:.*fc1"], "re:.*final_layer_norm"]]
    return [SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head", "re:.*mlp.gate$",
                                                                  "re:.*block_sparse_moe.gate$"])]


def main() -> None:
    args = parser(__doc__).parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    windows = load_windows(args.windows)
    calib = windows["calib"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    start = time.perf_counter()
    model = oneshot(model=model, dataset=data, recipe=recipe(model.config.model_type),
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                    shuffle_calibration_samples=False)
    quant_s = time.perf_counter() - start
    result = perplexity(model.eval(), windows["eval"])
    if args.save:
        model.save_pretrained(args.save, save_compressed=True)
    write_result(args.result, {"tool": "llm-compressor", "method": "smoothquant+gptq w8a8",
                               "quant_s": round(quant_s, 1), **result})


if __name__ == "__main__":
    main()
