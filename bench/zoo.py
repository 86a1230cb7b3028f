"""Zoo report: wiki-offline test perplexity (seqlen 2048) of the bundled models and, for MoE
models, per-layer expert frequency skew (max/min). Writes bench/results/zoo.json and zoo.md."""
from __future__ import annotations

import argparse

from common import machine, md_table, write_results

MODELS = ["smollm2-135m", "smollm2-8x135m", "tiny-mixtral"]


def evaluate(name: str, seqlen: int, max_windows: int | None) -> dict:
    from haq import zoo
    from haq.data.windows import eval_windows
    from haq.eval.perplexity import perplexity
    from haq.eval.routing import frequency_skew, routing_counter
    from haq.models.adapters import is_moe
    from haq.loading import load_model

    zoo.build(name)
    model, tokenizer, _ = load_model(name)
    windows = eval_windows("wiki-offline", tokenizer, seqlen=seqlen, max_windows=max_windows)
    row = {"name": name, "parameters": sum(p.numel() for p in model.parameters()),
           "experts": getattr(model.config, "num_local_experts", 0)}
    if is_moe(model.config):
        with routing_counter(model) as counts:
            result = perplexity(model, windows)
        row["expert_freq_max_min"] = [round(x, 3) for x in frequency_skew(counts)]
    else:
        result = perplexity(model, windows)
    row.update(ppl=result.ppl, seqlen=result.seqlen, tokens=result.tokens, windows=result.windows,
               eval_s=round(result.seconds, 1))
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    args = parser.parse_args()
    rows = [evaluate(name, args.seqlen, args.max_windows) for name in args.models]
    table = md_table(rows, ["name", "parameters", "experts", "ppl", "seqlen", "tokens", "eval_s"])
    skew = "\n".join(f"- {r['name']}: per-layer expert frequency max/min "
                     f"{min(r['expert_freq_max_min']):.2f} to {max(r['expert_freq_max_min']):.2f}"
                     for r in rows if "expert_freq_max_min" in r)
    markdown = "# Zoo: wiki-offline test perplexity\n\n" + table + "\n" + skew + "\n"
    write_results("zoo", {"machine": machine(), "dataset": "wiki-offline test", "models": rows}, markdown)


if __name__ == "__main__":
    main()
