"""Sampling, stop conditions, logprobs and detokenization with the real SmolLM2 model.

One model load for the module. Most checks read one large batch (run once, streamed
through `LLMEngine.step()`); comparisons that need a different batch run a second one, so
that "same seed, same tokens" is checked across batch compositions."""
import itertools

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.outputs import RequestOutput
from tandem.loader.tokenizer import render_chat

CAPITAL = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: 2018-..."
CATS = "I like cats. I like cats. I like"  # greedy repeats itself: " cats. I'm a cat. I'm a"
CHINESE = "你好 你好 你好 你好"  # greedy continues " 你好", each one 5 partial-UTF-8 tokens
YES = [{"role": "user", "content": "Say only the word yes."}]  # greedy: "Yes." then EOS
BANANA = " banana"

_ids = itertools.count()


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(model=smollm2_dir, dtype="float32", kv_cache_memory="128MiB")


def stream(llm: LLM, jobs: dict[str, tuple]) -> dict[str, tuple[RequestOutput, list]]:
    """Run `jobs` (name -> (prompt, params)) as one batch through engine.step(); returns each
    request's final output and every output it streamed before that."""
    engine = llm.engine
    names = {}
    for name, (prompt, params) in jobs.items():
        rid = f"{name}-{next(_ids)}"
        names[rid] = name
        engine.add_request(rid, prompt, params)
    history: dict[str, list[RequestOutput]] = {name: [] for name in jobs}
    while engine.has_unfinished_requests():
        for out in engine.step():
            history[names[out.request_id]].append(out)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return {name: (h[-1], h[:-1]) for name, h in history.items()}


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def sampled(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def chat_text(llm) -> str:
    return render_chat(llm.tokenizer, YES)[0]


@pytest.fixture(scope="module")
def batch(llm, chat_text):
    bias = llm.tokenizer.encode(BANANA)
    assert len(bias) == 1
    jobs = {
        "greedy": (CAPITAL, greedy(12)),
        "top_k_1": (CAPITAL, sampled(12, top_k=1)),
        "tiny_top_p": (CAPITAL, sampled(12, top_p=1e-6)),
        "min_p_1": (CAPITAL, sampled(12, min_p=1.0)),
        "tiny_temperature": (CAPITAL, SamplingParams(temperature=1e-40, max_tokens=12)),
        "seed7": (CAPITAL, sampled(10, seed=7)),
        "seed7_again": (CAPITAL, sampled(10, seed=7)),
        "seed8": (CAPITAL, sampled(10, seed=8)),
        "n2": (CAPITAL, sampled(8, n=2, seed=3)),
        "logprobs": (CAPITAL, sampled(8, seed=11, logprobs=5)),
        "cats": (CATS, greedy(10)),
        "cats_presence": (CATS, greedy(10, presence_penalty=2.0)),
        "cats_frequency": (CATS, greedy(10, frequency_penalty=2.0)),
        "cats_repetition": (CATS, greedy(10, repetition_penalty=1.5)),
        "bias": (CAPITAL, greedy(4, logit_bias={bias[0]: 100.0})),
        "chinese": (CHINESE, greedy(10)),
        "yes": (chat_text, greedy(8)),
        "yes_min_tokens": (chat_text, greedy(8, min_tokens=4)),
        "yes_ignore_eos": (chat_text, greedy(6, ignore_eos=True)),
        "yes_special": (chat_text, greedy(8, skip_special_tokens=False)),
    }
    return stream(llm, jobs)


def completion(batch, name: str, index: int = 0):
    return batch[name][0].outputs[index]


# --- greedy equivalents -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["top_k_1", "tiny_top_p", "min_p_1", "tiny_temperature"])
def test_filters_that_keep_one_token_equal_greedy(batch, name):
    # A temperature as small as 1e-40 is valid input; dividing the logits by it must not
    # turn them into inf/NaN (it should act as greedy, as vLLM does below 1e-5).
    assert completion(batch, name).token_ids == completion(batch, "greedy").token_ids
    assert completion(batch, name).text == completion(batch, "greedy").text


def test_max_tokens_finishes_with_length(batch):
    out = completion(batch, "greedy")
    assert out.finish_reason == "length" and out.stop_reason is None
    assert len(out.token_ids) == 12
    assert out.text.startswith(" Paris")
    assert out.logprobs is None and out.cumulative_logprob is None


# --- seeds --------------------------------------------------------------------------------------

def test_same_seed_same_tokens_in_one_batch(batch):
    assert completion(batch, "seed7").token_ids == completion(batch, "seed7_again").token_ids


def test_different_seeds_differ(batch):
    assert completion(batch, "seed7").token_ids != completion(batch, "seed8").token_ids


def test_seeded_output_does_not_depend_on_the_batch(llm, batch, second_batch):
    alone = llm.generate(CAPITAL, sampled(10, seed=7))
    assert len(alone) == 1 and alone[0].finished
    expected = completion(batch, "seed7").token_ids
    assert alone[0].outputs[0].token_ids == expected
    assert completion(second_batch, "seed7").token_ids == expected


def test_n_returns_indexed_completions(batch):
    out = batch["n2"][0]
    assert [c.index for c in out.outputs] == [0, 1]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert out.outputs[0].token_ids != out.outputs[1].token_ids


# --- penalties and bias ----------------------------------------------------------------------

def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


@pytest.mark.parametrize("name", ["cats_presence", "cats_frequency"])
def test_presence_and_frequency_penalties_reduce_repetition(batch, name):
    base = completion(batch, "cats").token_ids
    assert repeats(base) >= 3, "the baseline should repeat itself"
    assert repeats(completion(batch, name).token_ids) < repeats(base)


def test_repetition_penalty_avoids_prompt_tokens(batch, llm):
    prompt = set(llm.tokenizer.encode(CATS))

    def from_prompt(name):
        return sum(t in prompt for t in completion(batch, name).token_ids)

    assert from_prompt("cats_repetition") < from_prompt("cats")


def test_logit_bias_forces_a_token(batch, llm):
    (banana,) = llm.tokenizer.encode(BANANA)
    out = completion(batch, "bias")
    assert out.token_ids == [banana] * 4
    assert out.text == BANANA * 4


# --- EOS, min_tokens, ignore_eos ------------------------------------------------------------

def test_eos_stops_and_is_not_in_the_text(batch, llm):
    out = completion(batch, "yes")
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] in llm.engine.eos_token_ids
    assert len(out.token_ids) < 4, "the baseline must stop early for min_tokens to matter"
    assert out.text.strip().lower().startswith("yes") and "<|im_end|>" not in out.text


def test_min_tokens_forbids_eos_before_it(batch, llm):
    out = completion(batch, "yes_min_tokens")
    eos = llm.engine.eos_token_ids
    assert len(out.token_ids) >= 4
    assert not eos & set(out.token_ids[:4])
    if out.finish_reason == "stop":
        assert out.token_ids[-1] in eos


def test_ignore_eos_runs_to_max_tokens(batch):
    out = completion(batch, "yes_ignore_eos")
    assert out.finish_reason == "length" and len(out.token_ids) == 6


def test_chat_equals_generate_on_the_rendered_template(llm, batch):
    (out,) = llm.chat(YES, greedy(8))
    assert out.outputs[0].token_ids == completion(batch, "yes").token_ids
    assert out.outputs[0].text == completion(batch, "yes").text
    assert out.prompt == render_chat(llm.tokenizer, YES)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt)


# --- logprobs ---------------------------------------------------------------------------------

def test_logprobs_match_the_reference_model(batch, llm, smollm2_dir):
    from transformers import AutoModelForCausalLM

    out = batch["logprobs"][0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids) == 8
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = out.prompt_token_ids + comp.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    ref = logits.log_softmax(-1)[len(out.prompt_token_ids) - 1:-1]
    total = 0.0
    for pos, (token, entries) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[pos]
        assert token in entries and len(entries) in (5, 6)
        chosen = entries[token]
        assert chosen.logprob == pytest.approx(row[token].item(), abs=1e-3)
        assert chosen.rank == int((row > row[token]).sum()) + 1
        assert chosen.decoded_token == llm.tokenizer.decode([token])
        total += chosen.logprob
        top_lp, top_ids = row.topk(5)
        for rank, (t, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), start=1):
            assert t in entries, f"position {pos}: top-{rank} token missing"
            assert entries[t].rank == rank
            assert entries[t].logprob == pytest.approx(lp, abs=1e-3)
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-4)


# --- detokenization ---------------------------------------------------------------------------

def decoded(llm: LLM, ids: list[int]) -> str:
    # A completion cut inside a multi-byte character keeps the incomplete bytes out of its text.
    return llm.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_text_equals_decoding_the_tokens(batch, llm):
    for name, (out, _) in batch.items():
        if name == "yes_special":
            continue
        for comp in out.outputs:
            assert comp.text == decoded(llm, comp.token_ids), name


def test_special_tokens_kept_on_request(batch, llm):
    comp = completion(batch, "yes_special")
    assert comp.token_ids == completion(batch, "yes").token_ids
    assert comp.text == llm.tokenizer.decode(comp.token_ids, skip_special_tokens=False)
    assert comp.text.endswith("<|im_end|>")


def test_streamed_text_only_grows_and_ends_finished(batch):
    for name, (final, history) in batch.items():
        assert final.finished, name
        for earlier in history:
            assert not earlier.finished
            for comp, last in zip(earlier.outputs, final.outputs):
                assert last.text.startswith(comp.text), name
                assert last.token_ids[:len(comp.token_ids)] == comp.token_ids, name
                if comp.finish_reason is None:
                    assert "\ufffd" not in comp.text or "\ufffd" in last.text, name


def test_multibyte_characters_are_never_split(batch, llm):
    final, history = batch["chinese"]
    text = final.outputs[0].text
    assert "你好" in text and "\ufffd" not in text
    ids = final.outputs[0].token_ids
    # The model emits each character as several byte tokens: a naive per-token decode would
    # show replacement characters mid-stream.
    assert any("\ufffd" in llm.tokenizer.decode(ids[:k]) for k in range(1, len(ids)))
    assert len(history) == len(ids) - 1, "one streamed output per step"
    for out in history:
        partial = out.outputs[0].text
        assert "\ufffd" not in partial and text.startswith(partial)


def test_incremental_detokenizer_on_mixed_scripts(llm):
    tok = llm.tokenizer
    text = " 你好世界 😀 café ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), [], skip_special_tokens=True)
    seen = []
    for t in ids:
        assert detok.add(t) is None
        assert "\ufffd" not in detok.text and text.startswith(detok.text)
        seen.append(detok.output_text(finished=False))
    assert detok.output_text(finished=True) == text
    assert seen[-1] == text and len(set(seen)) < len(seen), "partial bytes were held back"


def test_incremental_detokenizer_holds_back_a_possible_stop_string(llm):
    tok = llm.tokenizer
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"), ["world"], skip_special_tokens=True)
    for t in tok.encode(" hello"):
        assert detok.add(t) is None
    assert detok.text == " hello"
    assert detok.output_text(finished=False) == " h"  # "ello" could start "world"
    assert detok.output_text(finished=True) == " hello"
    stop = None
    for t in tok.encode(" world again"):
        stop = stop or detok.add(t)
    assert stop == "world" and detok.text == " hello "


def test_stop_strings_are_ignored_while_check_stop_is_off(llm):
    tok = llm.tokenizer
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"), ["lo"], skip_special_tokens=True)
    assert all(detok.add(t, check_stop=False) is None for t in tok.encode(" hello"))
    assert detok.text == " hello"


# --- stop strings and stop tokens (a second batch, built from the greedy output) --------------

@pytest.fixture(scope="module")
def greedy_out(batch):
    out = completion(batch, "greedy")
    words = out.text.split()
    assert len(words) >= 4
    return out, words[2]  # e.g. "answer": in the middle of the output, not at its start


@pytest.fixture(scope="module")
def second_batch(llm, greedy_out):
    out, stop = greedy_out
    last = llm.tokenizer.decode(out.token_ids[1:2]).strip()
    assert last, "the second greedy token should be visible text"
    jobs = {
        "greedy": (CAPITAL, greedy(12)),
        "stop_string": (CAPITAL, greedy(12, stop=stop)),
        "stop_strings": (CAPITAL, greedy(12, stop=["never-generated", stop])),
        "stop_token": (CAPITAL, greedy(12, stop_token_ids=[out.token_ids[3]])),
        "stop_in_last_token": (CAPITAL, greedy(2, stop=last)),
        "seed7": (CAPITAL, sampled(10, seed=7)),  # other neighbours than in `batch`
        "prompt_ids": (llm.tokenizer.encode(CAPITAL), greedy(12)),
    }
    return stream(llm, jobs)


def test_greedy_is_reproducible_across_batches(batch, second_batch):
    assert completion(second_batch, "greedy").token_ids == completion(batch, "greedy").token_ids
    assert (completion(second_batch, "prompt_ids").token_ids
            == completion(batch, "greedy").token_ids)


@pytest.mark.parametrize("name", ["stop_string", "stop_strings"])
def test_stop_string_cuts_the_text_right_before_it(second_batch, greedy_out, name):
    out, stop = greedy_out
    comp = completion(second_batch, name)
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == out.text[:out.text.index(stop)]
    assert stop not in comp.text
    assert len(comp.token_ids) < len(out.token_ids)
    assert comp.token_ids == out.token_ids[:len(comp.token_ids)]
    for earlier in second_batch[name][1]:
        text = earlier.outputs[0].text
        assert stop not in text and comp.text.startswith(text)


def test_stop_token_id(second_batch, greedy_out, llm):
    out, _ = greedy_out
    stop_id = out.token_ids[3]
    comp = completion(second_batch, "stop_token")
    n = out.token_ids.index(stop_id) + 1
    assert comp.token_ids == out.token_ids[:n]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop_id
    # A stop token that is ordinary text stays in the output, as in vLLM.
    assert comp.text == llm.tokenizer.decode(out.token_ids[:n], skip_special_tokens=True)


def test_stop_string_in_the_last_allowed_token_still_reports_stop(second_batch, greedy_out, llm):
    # The second and last allowed token holds the stop string: the text is cut, so the
    # completion ended on the stop string and must say so, as vLLM does.
    out, _ = greedy_out
    last = llm.tokenizer.decode(out.token_ids[1:2]).strip()
    comp = completion(second_batch, "stop_in_last_token")
    assert comp.token_ids == out.token_ids[:2]
    first_two = llm.tokenizer.decode(out.token_ids[:2])
    assert comp.text == first_two[:first_two.index(last)]
    assert comp.stop_reason == last
    assert comp.finish_reason == "stop"
