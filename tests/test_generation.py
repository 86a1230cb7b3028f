"""Continuous batching: a sequence's tokens do not depend on its batch (greedy and seeded sampling,
float and int8, offloaded at several budgets), joins and leaves between steps, chunked prefill,
EOS and abort; sampling parameters validated."""
import copy

import pytest
import torch

from haq.errors import HaqError
from haq.runtime.generation import BatchGenerator
from haq.runtime.sampling import SamplingParams, next_token

LENGTHS = [5, 17, 9, 30, 3, 12, 22, 8]


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 4096, (n,), generator=g).tolist() for n in LENGTHS]


def alone_and_batched(model, params, **kwargs):
    ps = prompts()
    alone = [BatchGenerator(model, batch_invariant=True, **kwargs).generate([p], params)[0] for p in ps]
    batched = BatchGenerator(model, max_batch=8, batch_invariant=True, **kwargs).generate(ps, params)
    return alone, batched


@pytest.fixture(scope="module")
def models(tiny_dir):
    from transformers import AutoModelForCausalLM

    from haq import zoo
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    float_moe = AutoModelForCausalLM.from_pretrained(zoo.build("tiny-mixtral")).eval()
    int8_moe = copy.deepcopy(float_moe)
    quantize_model(int8_moe, Recipe(method="rtn"), torch.randint(0, 4096, (2, 32)), progress=False)
    random_moe = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-qwen2-moe")).eval()
    return {"tiny-mixtral": float_moe, "tiny-mixtral-int8": int8_moe, "tiny-qwen2-moe": random_moe}


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mixtral-int8", "tiny-qwen2-moe"])
def test_greedy_tokens_are_batch_invariant(models, name):
    alone, batched = alone_and_batched(models[name], SamplingParams(max_tokens=10))
    assert batched == alone


def test_batched_greedy_equals_plain_greedy_decoding(models):
    model = models["tiny-mixtral"]
    p = prompts()[1]
    ids, expected = torch.tensor([p]), []
    with torch.no_grad():
        for _ in range(8):
            token = model(ids).logits[0, -1].argmax()
            expected.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    assert BatchGenerator(model).generate([p], SamplingParams(max_tokens=8))[0] == expected


@pytest.mark.parametrize("budget_pct", [0, 50, 100])
@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mixtral-int8"])
def test_offloaded_batches_are_invariant_and_give_expert_calls_several_tokens(models, name, budget_pct):
    from haq.api import build_engine
    from haq.runtime.hardware import load_profile
    from haq.runtime.record import record_trace

    model = models[name]
    trace = record_trace(model, torch.randint(0, 4096, (2, 32)), name, progress=False)
    expected = [BatchGenerator(model, batch_invariant=True).generate([p], SamplingParams(max_tokens=6))[0]
                for p in prompts()]
    total = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if ".experts." in n)
    engine = build_engine(copy.deepcopy(model), budget_bytes=total * budget_pct // 100,
                          hardware=load_profile("rtx4090-pcie4"), policy="haq", profile=trace)
    seen_n = []
    decide = engine.policy.decide
    engine.policy.decide = lambda key, n, view: seen_n.append(n) or decide(key, n, view)
    outputs, metrics = engine.generate_batch(prompts(), SamplingParams(max_tokens=6), max_batch=8,
                                             batch_invariant=True)
    engine.close()
    assert outputs == expected
    assert max(seen_n) > 1 and metrics.device_bytes["experts_peak"] <= engine.budget_bytes


def test_sequences_join_and_leave_between_steps(models):
    model = models["tiny-mixtral-int8"]
    ps = prompts()
    lengths = [3, 9, 5, 12, 2, 7, 4, 10]
    expected = [BatchGenerator(model, batch_invariant=True).generate([p], SamplingParams(max_tokens=n))[0]
                for p, n in zip(ps, lengths)]
    gen = BatchGenerator(model, max_batch=3, batch_invariant=True, prefill_chunk=4)  # chunked prefill too
    ids = {gen.add(ps[i], SamplingParams(max_tokens=lengths[i])): i for i in range(4)}
    out: dict[int, list[int]] = {i: [] for i in range(8)}
    steps, widths = 0, []
    while gen.has_work:
        if steps == 5:  # late arrivals join a running batch
            ids.update({gen.add(ps[i], SamplingParams(max_tokens=lengths[i])): i for i in range(4, 8)})
        for event in gen.step():
            out[ids[event.seq_id]].append(event.token)
        widths.append(len(gen.running))
        steps += 1
    assert [out[i] for i in range(8)] == expected
    assert 2 <= max(widths) <= 3 and gen.cache is None  # several rows decoded together, never above max_batch


def test_seeded_sampling_is_reproducible_and_batch_invariant(models):
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    alone, batched = alone_and_batched(models["tiny-mixtral-int8"], params)
    assert batched == alone
    assert alone != alone_and_batched(models["tiny-mixtral-int8"], SamplingParams(max_tokens=8))[0]  # not greedy


def test_eos_stops_and_abort_frees_the_slot(models):
    model = models["tiny-mixtral"]
    p = prompts()[1]
    free = BatchGenerator(model).generate([p], SamplingParams(max_tokens=8))[0]
    stop_at = free[3]
    gen = BatchGenerator(model, eos_token_ids=(stop_at,))
    assert gen.generate([p], SamplingParams(max_tokens=8))[0] == free[:free.index(stop_at) + 1]
    gen = BatchGenerator(model, max_batch=2)
    first = gen.add(p, SamplingParams(max_tokens=50))
    gen.add(prompts()[2], SamplingParams(max_tokens=50))
    for _ in range(4):
        gen.step()
    assert len(gen.running) == 2
    gen.abort(first)
    assert len(gen.running) == 1 and gen.pads == [0]


def test_next_token_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert next_token(logits, [], SamplingParams(), None) == 1
    assert next_token(logits, [1], SamplingParams(repetition_penalty=10.0), None) == 2  # 3 / 10 < 2
    assert next_token(logits, [1, 2], SamplingParams(presence_penalty=2.0), None) == 0
    assert next_token(logits, [1, 2], SamplingParams(frequency_penalty=1.5), None) == 1  # once each: 1.5 < 3 - 1
    assert next_token(logits, [1, 1, 2], SamplingParams(frequency_penalty=1.5), None) == 0  # twice: 3 - 3 < 1
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, [], SamplingParams(temperature=1.0, top_k=1), g) for _ in range(20)} == {1}
    assert {next_token(logits, [], SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(20)} == {1}


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=-5), dict(temperature=-0.1),
                                 dict(temperature=3.0), dict(top_p=0.0), dict(top_k=-1),
                                 dict(repetition_penalty=0.0), dict(frequency_penalty=2.5), dict(seed=2**64),
                                 dict(seed=-2**63 - 1), dict(logprobs=21)])
def test_bad_sampling_parameters_are_clear_errors(bad):
    with pytest.raises(HaqError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_requests_beyond_the_context_or_empty_are_refused(models):
    gen = BatchGenerator(models["tiny-mixtral"], max_context=64)
    with pytest.raises(HaqError, match="exceeds the model's context of 64"):
        gen.add([1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(HaqError, match="empty"):
        gen.add([], SamplingParams())


def test_abort_while_waiting_or_prefilling_leaves_the_batch_intact(models):
    model = models["tiny-mixtral"]
    ps = prompts()
    expected = BatchGenerator(model).generate([ps[0]], SamplingParams(max_tokens=6))[0]
    gen = BatchGenerator(model, max_batch=2, prefill_chunk=4)
    keep = gen.add(ps[0], SamplingParams(max_tokens=6))
    prefilling = gen.add(ps[3], SamplingParams(max_tokens=6))  # 30 tokens: several chunks
    waiting = gen.add(ps[1], SamplingParams(max_tokens=6))
    out = []
    for step in range(40):
        if step == 4:
            assert gen.prefilling is not None and gen.prefilling.id == prefilling
            gen.abort(prefilling)
            gen.abort(waiting)
        out += [e.token for e in gen.step() if e.seq_id == keep]
        if not gen.has_work:
            break
    assert out == expected and not gen.has_work


def test_ignore_eos_runs_to_max_tokens(models):
    model = models["tiny-mixtral"]
    p = prompts()[1]
    free = BatchGenerator(model).generate([p], SamplingParams(max_tokens=8))[0]
    gen = BatchGenerator(model, eos_token_ids=(free[2],))
    assert gen.generate([p], SamplingParams(max_tokens=8, ignore_eos=True))[0] == free


def test_nan_weights_are_an_error_not_a_silent_stop_or_a_nan_perplexity(tiny_dir):
    """A damaged checkpoint (NaN in a weight) ends generation and perplexity with the reason, where
    it used to stop at the first token (argmax of NaN logits) and print `ppl nan`."""
    from transformers import AutoModelForCausalLM

    from haq.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-llama")).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(HaqError, match="NaN or infinite"):
        BatchGenerator(model).generate([prompts()[0]], SamplingParams(max_tokens=3))
    with pytest.raises(HaqError, match="window 0: .*NaN or infinite"):
        perplexity(model, torch.randint(0, 4096, (2, 16)), progress=False)


@pytest.mark.parametrize("value, bad", [(float("nan"), True), (float("inf"), True), (float("-inf"), False)])
def test_check_logits_refuses_a_nan_or_plus_inf_anywhere_in_the_step(value, bad):
    """One pass over the rows' maxima sees a single bad logit in any row; -inf rules a token out."""
    from haq.runtime.generation import _check_logits

    logits = torch.randn(3, 50)
    logits[2, 37] = value
    if bad:
        with pytest.raises(HaqError, match="NaN or infinite"):
            _check_logits(logits)
    else:
        _check_logits(logits)
    with pytest.raises(HaqError, match="NaN or infinite"):  # no token left to choose
        _check_logits(torch.full((1, 4), float("-inf")))


def test_logprobs_are_the_models_own_and_the_prompts_sum_to_its_loss(models):
    """Each generated token's log-probability is its entry of log_softmax(logits) (the greedy one the
    top one); the prompt's, over chunks of a chunked prefill, sum to minus the model's summed
    cross-entropy on the prompt, as `haq eval` computes it."""
    model = models["tiny-mixtral-int8"]
    prompt = prompts()[3]
    gen = BatchGenerator(model, prefill_chunk=7)
    gen.add(prompt, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=True))
    events = list(gen.stream())
    sizes = [len(e.prompt_logprobs) if e.prompt_logprobs else None for e in events]
    assert sizes == [len(prompt) - 1, None, None, None]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(prompt[1:]), reduction="sum")
    first = events[0].prompt_logprobs
    assert [lp.token for lp in first] == prompt[1:]
    assert sum(lp.logprob for lp in first) == pytest.approx(-loss.item(), rel=1e-4)
    for event in events:
        assert event.logprob.token == event.token and len(event.logprob.top) == 3
        assert event.logprob.top[0] == (event.token, event.logprob.logprob)  # greedy: the most likely token
        assert event.logprob.top[0][1] >= event.logprob.top[1][1] >= event.logprob.top[2][1]
    plain = BatchGenerator(model).generate([prompt], SamplingParams(max_tokens=4))[0]
    assert [e.token for e in events] == plain  # asking for log-probabilities changes no token
