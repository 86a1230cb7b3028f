"""lm-eval against `haq serve`: task accuracy of served checkpoints through lm-eval's own
`local-completions` client (loglikelihood requests: token ids, echo, logprobs), the way a user
scores a haq checkpoint on multiple-choice tasks. Writes bench/results/lm-eval-served.{json,md}.

    make bench-lm-eval     (lm-eval 0.4.13 in .peers/lmeval, bench/peers/setup.sh; then this)

No task comes from the Hugging Face hub here, so the task is built from the wiki-offline eval text
(deterministic): the first half of a sentence, and as choices its own second half among the second
halves of three other sentences (chance 0.25). Each model is served on 127.0.0.1 in its own
process (budget 0: every expert on the CPU, 1 thread: lm-eval's process shares the 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, git_rev, machine, md_table, write_results
from serve import start

LMEVAL = ROOT / ".peers" / "lmeval" / "bin" / "python"
TASK = "haq_sentence_completion"


def build_task(folder: Path, questions: int, seed: int = 0) -> None:
    """The task's JSONL and lm-eval YAML in `folder`."""
    from haq.data.sources import resolve, source_text

    text = source_text(resolve("wiki-offline"), "eval")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 60 < len(s.strip()) < 200]
    rng = random.Random(seed)
    rng.shuffle(sentences)
    if len(sentences) < 4 * questions:
        raise SystemExit(f"wiki-offline has {len(sentences)} usable sentences, {4 * questions} needed")

    def halves(sentence: str) -> tuple[str, str]:
        words = sentence.split()
        return " ".join(words[:len(words) // 2]), " " + " ".join(words[len(words) // 2:])

    docs = []
    for i in range(questions):
        question, answer = halves(sentences[i])
        choices = [halves(s)[1] for s in sentences[questions + 3 * i:questions + 3 * i + 3]] + [answer]
        rng.shuffle(choices)
        docs.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")


def lm_eval(base: str, tokenizer: Path, tasks: Path, out: Path, batch: int) -> dict:
    """lm-eval's result for the task served at `base`, and its wall time."""
    args = [str(LMEVAL), "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"model=m,base_url={base}/v1/completions,tokenizer_backend=huggingface,tokenizer={tokenizer},"
            "num_concurrent=1,max_retries=1", "--tasks", TASK, "--include_path", str(tasks),
            "--batch_size", str(batch), "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    result = json.loads(max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime).read_text())
    metrics = result["results"][TASK]
    return {"acc": metrics["acc,none"], "acc_stderr": metrics["acc_stderr,none"], "seconds": seconds,
            "lm_eval": result.get("lm_eval_version", "")}


def main() -> None:
    from haq.zoo import model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine_models = ROOT / ".peers" / "engine-models"
    parser.add_argument("--models", nargs="+", default=[
        f"fp32={model_path('smollm2-8x135m')}", f"int8 W8A8 RTN={engine_models / 'smollm2-8x135m-int8'}",
        f"int8 W8A8 RTN, int8 lm_head={engine_models / 'smollm2-8x135m-int8-lm-head'}",
        f"int8 W8A8 haq (default recipe, 32 x 512 calibration)={engine_models / 'smollm2-8x135m-haq'}"],
        help="LABEL=FOLDER pairs (default: smollm2-8x135m float, its RTN int8 checkpoints from make bench-engine, "
             "and its haq checkpoint, quantized here when missing)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4, help="lm-eval's --batch_size: prompts per request")
    args = parser.parse_args()
    if not LMEVAL.is_file():
        raise SystemExit(f"{LMEVAL} is missing: run `bash bench/peers/setup.sh lmeval` (make bench-lm-eval)")
    haq_ckpt = engine_models / "smollm2-8x135m-haq"
    if any(spec.endswith(f"={haq_ckpt}") for spec in args.models) and not haq_ckpt.is_dir():
        subprocess.run([sys.executable, "-m", "haq.cli", "quantize", "smollm2-8x135m", "--nsamples", "32",
                        "--seqlen", "512", "-o", str(haq_ckpt)], check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks"
        tasks.mkdir()
        build_task(tasks, args.questions)
        for i, spec in enumerate(args.models):
            label, folder = spec.split("=", 1)
            proc, base = start(folder, "0", max_batch=args.batch, hardware="laptop", threads=1, prefill_chunk=512)
            try:
                result = lm_eval(base, Path(folder), tasks, Path(tmp) / f"out{i}", args.batch)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            row = {"model": Path(folder).name, "weights": label, "questions": args.questions,
                   "acc": round(result["acc"], 4), "acc_stderr": round(result["acc_stderr"], 4),
                   "loglikelihoods": 4 * args.questions, "seconds": round(result["seconds"], 1),
                   "loglikelihoods_per_s": round(4 * args.questions / result["seconds"], 2),
                   "load": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(row, flush=True)
    lm_version = result["lm_eval"]
    md = (f"# lm-eval against `haq serve` ({machine()['cpu']}, git {git_rev()})\n\n"
          f"`python bench/lm_eval_served.py` (`make bench-lm-eval`): lm-eval {lm_version} `local-completions` "
          f"(loglikelihood: token ids, echo, logprobs 1, batches of {args.batch} prompts per request) against "
          f"`haq serve MODEL --gpu-budget 0 --threads 1`, one server per model. Task: {args.questions} four-way "
          "sentence completions built from the wiki-offline eval text (a sentence's first half; its own second "
          "half among three others'; chance 0.25); acc is lm-eval's, with its standard error. Each choice is one "
          f"loglikelihood (4 per question), {args.batch} to an HTTP request; seconds include lm-eval's own work.\n\n" + md_table(rows))
    write_results("lm-eval-served", {"machine": machine(), "git": git_rev(), "lm_eval": lm_version,
                                     "questions": args.questions, "rows": rows}, md)


if __name__ == "__main__":
    main()
