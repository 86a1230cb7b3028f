"""`tiny-mixtral`: a small real `MixtralForCausalLM` (~14.5M parameters, 8 experts, top-2) trained
from scratch on the wiki-offline train split, with its own 4096-token byte-level BPE tokenizer.

The trained weights ship in `haq/zoo/assets/tiny-mixtral/` (fp16 safetensors, tokenizer,
`training.json`), so nobody has to retrain; this module is the reproducible recipe:

    python tools/train_tiny_mixtral.py --out haq/zoo/assets/tiny-mixtral --steps N

Everything is seeded and runs on one CPU thread (`torch.set_num_threads(1)`), so a rerun with the
same arguments and library versions retraces the same run (bit-exactness across machines/BLAS
builds is not promised).

Notes:
- Experts run with transformers' "eager" per-expert loop (`experts_implementation="eager"`) during
  training; the fused 3-D layout ([E, 2I, H] gate_up_proj, [E, H, I] down_proj) is the same for
  every implementation, so a loader may pick any.
- The saved config has `output_router_logits=False`: with it True, HF adds the router aux loss to
  `loss` whenever labels are passed, which would inflate every perplexity computed from `loss`.
  Training passes `output_router_logits=True` per call instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ENDOFTEXT = "<|endoftext|>"
VOCAB_SIZE = 4096
ASSET_DIR = Path(__file__).resolve().parents[1] / "haq" / "zoo" / "assets" / "tiny-mixtral"


# --------------------------------------------------------------------------------------------------
# tokenizer
def train_tokenizer(out_dir: str | os.PathLike | None = None, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE tokenizer (`vocab_size` tokens incl. `<|endoftext|>`) on the
    wiki-offline train split only; return it as a `PreTrainedTokenizerFast` and, if `out_dir` is
    given, save it there (tokenizer.json, tokenizer_config.json, ...) for `AutoTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from haq.data.wiki_offline import documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = documents("train")
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def token_stream(tokenizer, split: str) -> torch.Tensor:
    """One split as a flat int64 tensor: `<|endoftext|>` before every article (the document
    separator doubles as BOS)."""
    from haq.data.wiki_offline import documents

    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    docs = list(documents(split))
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for e in enc:
        ids.append(eos)
        ids.extend(e)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# model
def tiny_mixtral_config(vocab_size: int = VOCAB_SIZE, **overrides):
    """The tiny-mixtral architecture: hidden 256, 4 layers, 8 heads (4 KV heads), 8 experts top-2,
    512 intermediate per expert, tied embeddings (~14.5M parameters)."""
    from transformers import MixtralConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        sliding_window=None,
        attention_dropout=0.0,
        num_experts_per_tok=2,
        num_local_experts=8,
        output_router_logits=False,  # training turns it on per call; see module docstring
        router_aux_loss_coef=0.02,
        router_jitter_noise=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        experts_implementation="eager",  # per-expert loop: works (and trains) on any device
    )
    kw.update(overrides)
    return MixtralConfig(**kw)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """GPTQ protocol: non-overlapping windows of `seqlen` tokens (the tail that does not fill a
    window is dropped), mean token NLL over all windows, exp."""
    was_training = model.training
    model.eval()
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"need at least {seqlen} tokens, have {ids.numel()}")
    nll, count = 0.0, 0
    for i in range(n):
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
        out = model(input_ids=x, labels=x, use_cache=False, output_router_logits=False)
        nll += out.loss.item() * (seqlen - 1)
        count += seqlen - 1
    model.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def expert_frequency(model, ids: torch.Tensor, seqlen: int = 512, max_tokens: int = 16384) -> torch.Tensor:
    """Fraction of top-k routing slots that go to each expert, per layer: [layers, experts]."""
    model.eval()
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)
    ids = ids[:max_tokens]
    for i in range(max(1, ids.numel() // seqlen)):
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
        out = model(input_ids=x, use_cache=False, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            top = logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(top, minlength=cfg.num_local_experts).float()
    return counts / counts.sum(dim=1, keepdim=True)


def per_layer_balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed per MoE layer and averaged over layers:
    E * sum_e f_e * P_e, with f_e the share of top-k routing slots and P_e the mean router
    probability of expert e in that layer. 1.0 when balanced (HF's Mixtral aux loss pools all
    layers' tokens together and is scaled by top_k)."""
    total = 0.0
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1]).float()
        n_exp = logits.shape[-1]
        probs = logits.softmax(dim=-1)
        idx = probs.topk(top_k, dim=-1).indices
        ones = torch.ones(idx.numel(), device=logits.device)
        f = torch.zeros(n_exp, device=logits.device).scatter_add_(0, idx.flatten(), ones) / idx.numel()
        total = total + n_exp * (f * probs.mean(dim=0)).sum()
    return total / len(router_logits)


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------------------------------
# training
def train(
    out_dir: str | os.PathLike,
    steps: int,
    seed: int = 0,
    seqlen: int = 256,
    batch: int = 16,
    lr: float = 3e-3,
    *,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    eval_seqlen: int = 2048,
    long_every: int = 0,
    threads: int = 1,
) -> dict:
    """Train tiny-mixtral from scratch and save it (fp16 safetensors + tokenizer + training.json)
    to `out_dir`, atomically (written to a temp dir next to it, then renamed).

    Loss: token cross-entropy + `router_aux_loss_coef` * per-layer load-balancing loss
    (`per_layer_balance_loss`). Schedule: linear warmup (`warmup`, default 5% of steps) then cosine to 10% of `lr`; AdamW
    (0.9, 0.95), weight decay on matrices only, grad-norm clip 1.0. Each step draws `batch` random
    windows of `seqlen` tokens from the train stream. If `long_every` > 0, every `long_every`-th
    step instead draws windows of `eval_seqlen` tokens (same token count per step) so the model has
    seen positions up to `eval_seqlen`. Returns the training.json dict."""
    from tqdm import tqdm
    import tokenizers
    import transformers
    from transformers import MixtralForCausalLM

    t_start = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = train_tokenizer(tmp)
        train_ids = token_stream(tokenizer, "train")
        valid_ids = token_stream(tokenizer, "valid")
        print(f"tokens: train {train_ids.numel():,}, valid {valid_ids.numel():,}", flush=True)

        cfg = tiny_mixtral_config(vocab_size=len(tokenizer))
        model = MixtralForCausalLM(cfg)
        model.config._experts_implementation = "eager"
        n_params = sum(p.numel() for p in model.parameters())
        print(f"parameters: {n_params:,}", flush=True)
        model.train()

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.95), eps=1e-8,
        )
        warmup = warmup if warmup is not None else max(1, steps // 20)
        gen = torch.Generator().manual_seed(seed)
        tokens_per_step = batch * seqlen
        losses: list[float] = []
        aux_losses: list[float] = []
        t_train = time.time()
        bar = tqdm(range(steps), desc="tiny-mixtral", mininterval=5.0, dynamic_ncols=False, ncols=100)
        for step in bar:
            long = long_every > 0 and (step + 1) % long_every == 0
            L = eval_seqlen if long else seqlen
            B = max(1, tokens_per_step // L) if long else batch
            starts = torch.randint(0, train_ids.numel() - L, (B,), generator=gen)
            x = torch.stack([train_ids[s:s + L] for s in starts.tolist()])
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr, warmup)
            # no labels: HF would add its own aux loss, which balances experts over all layers
            # pooled (one layer's dead expert is "paid for" by another layer's busy one)
            out = model(input_ids=x, use_cache=False, output_router_logits=True)
            lm_loss = model.loss_function(out.logits, x, cfg.vocab_size)
            aux_loss = per_layer_balance_loss(out.router_logits, cfg.num_experts_per_tok)
            loss = lm_loss + cfg.router_aux_loss_coef * aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lm, aux = lm_loss.item(), aux_loss.item()
            losses.append(lm)
            aux_losses.append(aux)
            bar.set_postfix(loss=f"{lm:.3f}", aux=f"{aux:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}", refresh=False)
        bar.close()
        train_time = time.time() - t_train
        tail = max(1, min(20, steps // 10))
        final_loss = sum(losses[-tail:]) / tail
        print(f"train: {steps} steps in {train_time:.0f}s, final loss (mean of last {tail}) {final_loss:.4f}", flush=True)

        t_eval = time.time()
        ppl = perplexity(model, valid_ids, eval_seqlen)
        freq = expert_frequency(model, valid_ids)
        print(f"valid PPL @ seqlen {eval_seqlen}: {ppl:.2f} ({time.time() - t_eval:.0f}s)", flush=True)

        model = model.to(torch.float16)
        model.generation_config.bos_token_id = cfg.bos_token_id
        model.generation_config.eos_token_id = cfg.eos_token_id
        model.generation_config.pad_token_id = cfg.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        info = {
            "model": "tiny-mixtral",
            "reproduce": (f"python tools/train_tiny_mixtral.py --out OUT --steps {steps} --seed {seed} --seqlen {seqlen}"
                          f" --batch {batch} --lr {lr} --long-every {long_every} --eval-seqlen {eval_seqlen}"
                          + (f" --warmup {warmup}" if warmup != max(1, steps // 20) else "")),
            "architecture": "MixtralForCausalLM",
            "parameters": n_params,
            "corpus": "wiki-offline train split (haq.data.wiki_offline)",
            "train_tokens": int(train_ids.numel()),
            "steps": steps,
            "seqlen": seqlen,
            "batch": batch,
            "long_every": long_every,
            "tokens_seen": int(sum(
                (tokens_per_step // eval_seqlen) * eval_seqlen
                if (long_every > 0 and (s + 1) % long_every == 0) else tokens_per_step
                for s in range(steps))),
            "lr": lr,
            "warmup": warmup,
            "schedule": "linear warmup, cosine to 0.1*lr",
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": weight_decay, "clip": 1.0},
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "router_aux_loss": "per-layer Switch balance loss, mean over layers (1.0 = balanced)",
            "seed": seed,
            "threads": threads,
            "train_wall_s": round(train_time, 1),
            "wall_s": round(time.time() - t_start, 1),
            "final_train_loss": round(final_loss, 4),
            "final_train_loss_window": tail,
            "final_aux_loss": round(sum(aux_losses[-tail:]) / tail, 4),
            "loss_curve": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4) for i in range(0, steps, 10)],
            "valid_ppl": round(ppl, 3),
            "valid_ppl_seqlen": eval_seqlen,
            "valid_ppl_dtype": "float32",
            "expert_frequency_valid": [[round(v, 4) for v in row] for row in freq.tolist()],
            "saved_dtype": "float16",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__},
        }
        (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        # atomic swap: old -> backup, tmp -> out, drop backup
        backup = None
        if out_dir.exists():
            backup = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(backup)
        tmp.rename(out_dir)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        print(f"saved to {out_dir}", flush=True)
        return info
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/train_tiny_mixtral.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ASSET_DIR))
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--long-every", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    info = train(a.out, a.steps, seed=a.seed, seqlen=a.seqlen, batch=a.batch, lr=a.lr, warmup=a.warmup,
                 eval_seqlen=a.eval_seqlen, long_every=a.long_every, threads=a.threads)
    print(json.dumps({k: info[k] for k in ("parameters", "steps", "wall_s", "final_train_loss",
                                           "valid_ppl", "valid_ppl_seqlen")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
