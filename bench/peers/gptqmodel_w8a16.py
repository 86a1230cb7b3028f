"""GPTQModel weight-only W8A16: GPTQ 8-bit, per output channel (group_size -1), act-order,
symmetric; activations stay float (bfloat16: GPTQModel's CPU kernel takes no float32). Quantized, saved, reloaded with GPTQModel's CPU kernels (as a
user runs it) and scored in this process. Runs in .peers/gptqmodel (gptqmodel 7.6.0); on 2
cores it needs GPTQMODEL_CPU_WORKERS=2 (set by bench/peers.py)."""
from __future__ import annotations

import tempfile
import time

import torch
from _common import load_windows, parser, perplexity, write_result


def main() -> None:
    args = parser(__doc__).parse_args()
    from gptqmodel import GPTQModel, QuantizeConfig

    windows = load_windows(args.windows)
    calib = windows["calib"]
    config = QuantizeConfig(bits=8, group_size=-1, desc_act=True, sym=True)
    model = GPTQModel.load(args.model, config, device="cpu", dtype=torch.float32)
    rows = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
    start = time.perf_counter()
    model.quantize(rows, batch_size=1, calibration_sort=None)
    quant_s = time.perf_counter() - start
    out = args.save or tempfile.mkdtemp(prefix="gptqmodel-")
    model.save(out)
    del model
    # Its CPU kernel (TorchLinear) takes float16 / bfloat16 activations only.
    model = GPTQModel.load(out, device="cpu", dtype=torch.bfloat16)
    result = perplexity(model.model.eval(), windows["eval"])
    write_result(args.result, {"tool": "GPTQModel", "method": "gptq w8a16 (bf16 activations)",
                               "quant_s": round(quant_s, 1), **result})


if __name__ == "__main__":
    main()
