"""Where W8A8 loses perplexity: the float model with only one kind of linear input fake-quantized
to int8 per token (weights untouched), with and without each window's first token (the attention
sink) left in float, before and after the rotations of `--rotate` (residual stream offline, dense
down_proj inputs online; exact in float).
Writes bench/results/act_sensitivity.json and .md."""
from __future__ import annotations

import argparse

import torch

from common import machine, md_table, write_results


def main() -> None:
    from haq import zoo
    from haq.data.windows import eval_windows
    from haq.eval.perplexity import perplexity
    from haq.loading import load_model
    from haq.quant.rotation import rotate_online_inputs, rotate_residual
    from haq.kernels.grid import fake_quant_act

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=2)
    parser.add_argument("--abits", type=int, default=8)
    args = parser.parse_args()
    zoo.build(args.model)
    model, tokenizer, _ = load_model(args.model)
    windows = eval_windows("wiki-offline", tokenizer, seqlen=2048, max_windows=args.max_windows)
    kinds = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
             "gate/up": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

    def quantize(x: torch.Tensor, keep_first: bool) -> torch.Tensor:
        y = fake_quant_act(x, args.abits, "per-token")
        if keep_first:
            y[:, 0] = x[:, 0]
        return y

    def ppl_with(names: tuple[str, ...], keep_first: bool) -> float:
        handles = [m.register_forward_pre_hook(lambda _m, a: (quantize(a[0], keep_first), *a[1:]))
                   for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
        try:
            return perplexity(model, windows, progress=False).ppl
        finally:
            for h in handles:
                h.remove()

    fp = perplexity(model, windows, progress=False).ppl
    rows = []
    for rotated in (False, True):
        if rotated:
            rotate_residual(model)
            rotate_online_inputs(model)  # its pre-hooks run before the fake-quant hooks registered later
            fp_rotated = perplexity(model, windows, progress=False).ppl
            assert abs(fp_rotated / fp - 1) < 1e-4, (fp_rotated, fp)  # the rotation is exact in float
        for kind, names in kinds.items():
            for keep_first in (False, True):
                ppl = ppl_with(names, keep_first)
                rows.append({"inputs quantized": kind, "rotated (--rotate)": rotated, "first token float": keep_first,
                             "ppl": ppl, "fp_ppl": fp, "delta_pct": round(100 * (ppl / fp - 1), 3)})
                print(rows[-1], flush=True)
    md = (f"# Activation sensitivity of {args.model} (A{args.abits} per token, weights float)\n\n"
          f"wiki-offline test, first {args.max_windows} windows of 2048 tokens; one kind of linear input "
          f"fake-quantized at a time.\n\n" + md_table(rows, list(rows[0])))
    write_results("act_sensitivity", {"machine": machine(), "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
    main()
