"""Generation: cached decode == full forward, greedy == a no-cache loop and HF `generate`,
left-padded batches == prompts alone, seeded sampling, EOS, stop strings, the compiled step
(no recompiles) and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

import llmfn.cached_decode as cached_decode_module
import llmfn.generate  # noqa: F401  (the module; `llmfn.generate` is the function)
from llmfn import generate as generate_fn
from llmfn import stream as stream_fn
from llmfn.cached_decode import (
    decode_step,
    decode_weights,
    pad_prompts,
    prefill,
    slot_mask,
    slot_positions,
)
from llmfn.generate import generate, generate_text, main, stream, stream_text
from llmfn.model import forward, forward_cached, init_cache, init_params
from llmfn.model_config import ModelConfig
from llmfn.streaming_text import TextRow
from llmfn.token_sampling import filter_top_k_top_p, init_sampler, penalize_repeats, sample_step

REPO = Path(__file__).resolve().parents[1]
generate_module = sys.modules["llmfn.generate"]

BASE = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64)
CONFIGS = {
    "llama_gqa": ModelConfig(**BASE, num_kv_heads=2),
    "mqa_sliding_window": ModelConfig(**BASE, num_kv_heads=1, sliding_window=3),
    "moe": ModelConfig(**BASE, use_moe=True, num_experts=4, top_k=2, num_shared_experts=1),
    "gpt2_like": ModelConfig(
        **BASE,
        position="learned",
        norm_type="layernorm",
        use_glu=False,
        activation="gelu_tanh",
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    ),  # fmt: skip
    "alibi_post_norm": ModelConfig(**BASE, position="alibi", norm_position="post"),
    "sinusoidal": ModelConfig(**BASE, position="sinusoidal", num_kv_heads=2),
}


def sharp_params(cfg: ModelConfig, seed: int = 0) -> TensorDict:
    """Random params with q/k scaled by 10, so attention is far from uniform (DESIGN.md §5)."""
    params = init_params(cfg, seed=seed)
    qk_rows = (cfg.num_heads + cfg.kv_heads) * cfg.head_dim
    for i in range(cfg.num_layers):
        params["layers", str(i), "attn", "wqkv"][:qk_rows] *= 10
    return params


PARAMS = {name: sharp_params(cfg) for name, cfg in CONFIGS.items()}


def greedy_without_cache(params, cfg, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(forward(params, torch.tensor([ids]), cfg)[0, -1].argmax()))
    return ids[len(prompt) :]


# --- Cached decode == full forward ------------------------------------------------------------
@settings(max_examples=12)
@given(
    name=st.sampled_from(sorted(CONFIGS)),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_cached_decode_equals_full_forward_at_every_position(name, lengths, steps, seed):
    cfg, params = CONFIGS[name], PARAMS[name]
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, cfg.vocab_size, (n + steps,), generator=gen).tolist() for n in lengths]
    tokens, pad = pad_prompts([row[:n] for row, n in zip(rows, lengths, strict=True)])
    prompt_len, max_len = tokens.shape[1], tokens.shape[1] + steps
    key_valid = slot_mask(pad, max_len)
    cache = init_cache(cfg, len(rows), max_len)
    with torch.no_grad():
        prompt_logits, cache = prefill(params, cache, tokens, pad, key_valid, cfg)
        step_logits = []
        for t in range(steps):
            slot = torch.tensor(prompt_len + t)
            next_tokens = torch.tensor([[row[n + t]] for row, n in zip(rows, lengths, strict=True)])
            logits, cache = decode_step(
                params, cache, next_tokens, slot, cfg,
                attention_mask=key_valid, positions=slot_positions(slot, pad),
            )  # fmt: skip
            step_logits.append(logits)
        for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            full = forward(params, torch.tensor([row]), cfg)[0]  # [n + steps, V]
            cached = torch.cat(
                [prompt_logits[b, prompt_len - n :], torch.stack([s[b] for s in step_logits])]
            )
            torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_prefill_last_only_is_the_last_row_of_the_full_prefill():
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    tokens, pad = pad_prompts([[5, 6, 7, 8], [9, 10]])
    key_valid = slot_mask(pad, 8)
    with torch.no_grad():
        full, full_cache = prefill(params, init_cache(cfg, 2, 8), tokens, pad, key_valid, cfg)
        last, last_cache = prefill(
            params, init_cache(cfg, 2, 8), tokens, pad, key_valid, cfg, last_only=True
        )
    assert last.shape == (2, 1, cfg.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])
    assert (last_cache == full_cache).all()


def test_decode_weights_makes_panels_once_and_column_major_where_they_do_not_fit(monkeypatch):
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    wqkv = params["layers", "0", "attn", "wqkv"]  # [64, 32]
    panels = decode_weights(params)
    panel = panels["layers", "0", "attn", "wqkv"]
    assert panel.shape == (64 // 8, 32, 8) and panel.is_contiguous()
    assert torch.equal(panel[1], wqkv[8:16].t())  # panel p: output rows 8p .. 8p + 7
    assert wqkv.is_contiguous() and wqkv.dim() == 2  # the input is untouched
    assert panels["lm_head", "weight"].shape == (61, 32)  # 61 rows: no panels, column-major
    assert panels["lm_head", "weight"].stride() == (1, 61)
    assert panels["embed", "weight"] is params["embed", "weight"]  # a lookup table
    assert decode_weights(panels)["layers", "0", "attn", "wqkv"] is panel  # converts once

    # Without the kernel (no C compiler), column-major weights for F.linear instead.
    monkeypatch.setattr(cached_decode_module, "kernel_available", lambda: False)
    column_major = decode_weights(params)
    converted = column_major["layers", "0", "attn", "wqkv"]
    assert converted.shape == wqkv.shape and converted.stride() == (1, wqkv.shape[0])
    assert torch.equal(converted, wqkv)
    assert decode_weights(column_major)["layers", "0", "attn", "wqkv"] is converted

    prompts = [[1, 2, 3, 4], [5, 6], [7], [8, 9, 10]]
    expected = generate(params, cfg, prompts, max_new_tokens=5)  # converts to column-major now
    assert generate(panels, cfg, prompts, max_new_tokens=5) == expected
    assert generate(column_major, cfg, prompts, max_new_tokens=5) == expected


def test_cached_attention_reads_only_the_written_slots_on_cpu():
    from llmfn.layers.attention import written_slots

    k, v = torch.randn(2, 3, 16, 4), torch.randn(2, 3, 16, 4)
    key_valid = torch.ones(2, 16, dtype=torch.bool)
    k_used, v_used, valid_used = written_slots(k, v, key_valid, torch.tensor(5))
    assert k_used.shape == v_used.shape == (2, 3, 5, 4) and valid_used.shape == (2, 5)
    assert torch.equal(k_used, k[:, :, :5])


def test_forward_cached_compiles_fullgraph_without_scalar_capture():
    """A user's own torch.compile of the cached forward keeps the whole cache instead of
    breaking the graph on the read of the written length."""
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    tokens, cache, start = torch.tensor([[1, 2, 3]]), init_cache(cfg, 1, 16), torch.tensor(0)
    compiled = torch.compile(
        lambda p, t, c, s: forward_cached(p, t, cfg, c, s), fullgraph=True, backend="eager"
    )
    with torch.no_grad():
        got, _ = compiled(params, tokens, cache, start)
        expected, _ = forward_cached(params, tokens, cfg, cache, start)
    torch.testing.assert_close(got, expected)


def test_decode_step_is_pure():
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    cache = init_cache(cfg, 2, 8)
    before = cache.clone()
    _, new_cache = decode_step(params, cache, torch.tensor([[3], [4]]), torch.tensor(0), cfg)
    assert (cache == before).all()
    assert not torch.equal(new_cache["layers", "0", "k"], before["layers", "0", "k"])


# --- Greedy generation ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_equals_a_loop_without_cache(name):
    cfg, params = CONFIGS[name], PARAMS[name]
    prompt = [5, 17, 3, 42, 8, 9]
    assert generate(params, cfg, [prompt], max_new_tokens=9) == [
        greedy_without_cache(params, cfg, prompt, 9)
    ]


@pytest.mark.parametrize("name", ["llama_gqa", "mqa_sliding_window", "moe", "gpt2_like"])
def test_left_padded_batch_equals_each_prompt_alone(name):
    cfg, params = CONFIGS[name], PARAMS[name]
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [30, 31, 32, 33], [12, 40]]
    batched = generate(params, cfg, prompts, max_new_tokens=8)
    assert batched == [generate(params, cfg, [p], max_new_tokens=8)[0] for p in prompts]
    assert len({tuple(row) for row in batched}) == 4  # the rows really differ


def test_tensor_prompts_and_the_package_exports():
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    tokens = torch.tensor([[4, 5, 6], [7, 8, 9]])
    expected = generate(params, cfg, tokens.tolist(), max_new_tokens=4)
    assert generate_fn(params, cfg, tokens, max_new_tokens=4) == expected
    steps = list(stream_fn(params, cfg, tokens, max_new_tokens=4))
    assert [list(row) for row in zip(*steps, strict=True)] == expected


def test_streaming_yields_one_token_per_row_per_step():
    cfg, params = CONFIGS["moe"], PARAMS["moe"]
    steps = []
    for step in stream(params, cfg, [[1, 2], [3, 4, 5]], max_new_tokens=5):
        assert torch.is_grad_enabled()  # the generator holds no no_grad() across a yield
        steps.append(step)
    assert len(steps) == 5 and all(
        len(s) == 2 and all(isinstance(t, int) for t in s) for s in steps
    )
    assert [list(r) for r in zip(*steps, strict=True)] == generate(
        params, cfg, [[1, 2], [3, 4, 5]], max_new_tokens=5
    )


def test_each_row_stops_at_eos_and_the_loop_ends_when_all_have():
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    prompts = [[5, 17, 3], [40, 2, 9, 11]]
    free = generate(params, cfg, prompts, max_new_tokens=10)
    k = next(k for k in range(1, 10) if free[0][k] not in free[0][:k])  # row 0 emits eos at step k
    eos = free[0][k]
    cut = [row[: row.index(eos) + 1] if eos in row else row for row in free]
    steps = list(stream(params, cfg, prompts, max_new_tokens=10, eos_id=eos))
    assert len(steps) == max(len(row) for row in cut)
    assert [[t for t in row if t is not None] for row in zip(*steps, strict=True)] == cut
    assert all(step[0] is None for step in steps[k + 1 :])  # row 0 is finished after its EOS
    assert generate(params, cfg, prompts, max_new_tokens=10, eos_id=eos) == cut
    both = list(stream(params, cfg, [prompts[0], prompts[0]], max_new_tokens=10, eos_id=eos))
    assert both == [[t, t] for t in free[0][: k + 1]]  # both rows done: the loop ends


# --- Sampling ---------------------------------------------------------------------------------
def test_same_seed_same_samples_and_other_seeds_differ():
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    options = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2)
    first = generate(params, cfg, [[1, 2, 3], [4]], seed=7, **options)
    assert first == generate(params, cfg, [[1, 2, 3], [4]], seed=7, **options)
    assert first != generate(params, cfg, [[1, 2, 3], [4]], seed=8, **options)
    assert first != generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=12)  # not greedy


def test_samples_follow_the_softmax_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    rows = 20000
    logits = probs.log().expand(rows, -1)
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    sampler, flags = init_sampler(
        tokens, torch.zeros(rows, dtype=torch.long), 5, temperature=1.0, top_k=None,
        top_p=None, repetition_penalty=1.0, eos_id=None, seed=3,
    )  # fmt: skip
    ids, _ = sample_step(logits, sampler, torch.tensor(0), flags)
    freq = torch.bincount(ids, minlength=5).float() / rows
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    hot, _ = sample_step(
        logits, {**sampler, "temperature": torch.tensor(0.25)}, torch.tensor(0), flags
    )
    assert (hot == 0).float().mean() > 0.9  # a low temperature sharpens


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), top_k=st.integers(1, 12), top_p=st.floats(0.05, 1.0))
def test_top_k_top_p_and_repetition_penalty_match_hf(seed, top_k, top_p):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 12, generator=gen) * 3
    ours = filter_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p))
    theirs = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits.clone()))
    assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.equal(ours[~ours.isinf()], logits[~ours.isinf()])

    history = torch.randint(0, 12, (3, 5), generator=gen)
    seen = torch.zeros(3, 12, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(penalize_repeats(logits, seen, torch.tensor(1.3)), expected)


@pytest.mark.parametrize("compile", [False, True])
def test_vocab_limit_never_samples_ids_past_it(compile, monkeypatch):
    """Ids >= vocab_limit (a padded vocabulary's extra rows) are never sampled, greedy or not,
    eager or compiled; the compiled step still never recompiles."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(generate_module, "COMPILE_BACKEND", "eager")
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    prompts = [[1, 2, 3], [4, 50, 60, 7, 8]]  # prompts may hold any model id
    modes = [
        dict(temperature=0.0),
        dict(temperature=1.5, seed=1),
        dict(temperature=1.5, top_k=50, top_p=0.99, repetition_penalty=1.3, seed=2),
    ]
    torch._dynamo.reset()
    counters.clear()
    for options in modes:
        free = generate(params, cfg, prompts, max_new_tokens=12, **options)
        assert max(max(row) for row in free) >= 20  # the model does pick ids past the limit
        limited = generate(
            params, cfg, prompts, max_new_tokens=12, vocab_limit=20, compile=compile, **options
        )
        assert all(0 <= i < 20 for row in limited for i in row), (options, limited)
        if compile:
            with torch._dynamo.config.patch(error_on_recompile=True):
                again = generate(
                    params, cfg, prompts, max_new_tokens=12, vocab_limit=30, compile=True,
                    **options,
                )  # fmt: skip
            assert all(i < 30 for row in again for i in row)
            assert limited == generate(
                params, cfg, prompts, max_new_tokens=12, vocab_limit=20, **options
            )
    assert counters["stats"]["unique_graphs"] == (len(modes) if compile else 0)
    # A limit at or past the model's vocabulary changes nothing.
    assert generate(params, cfg, prompts, max_new_tokens=6, vocab_limit=61) == generate(
        params, cfg, prompts, max_new_tokens=6
    )


def test_cpu_memory_is_the_lower_of_ram_and_the_container_limit(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    v1.write_text("1073741824\n")
    assert generate_module.cgroup_memory_limits([str(v2), str(v1), str(tmp_path / "none")]) == [
        2**30
    ]
    monkeypatch.setattr(generate_module, "cgroup_memory_limits", lambda: [2**30])
    assert generate_module.device_memory(torch.device("cpu")) == 2**30
    monkeypatch.setattr(generate_module, "cgroup_memory_limits", lambda: [2**62])
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert generate_module.device_memory(torch.device("cpu")) == physical


def test_a_kv_cache_too_large_for_the_device_is_a_clear_error(monkeypatch):
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]  # 256 cache bytes per slot and row
    with pytest.raises(
        ValueError, match=r"max_new_tokens=1000000000000 needs a KV cache of"
    ) as err:
        stream(params, cfg, [[1, 2]], max_new_tokens=10**12)  # at the call, before any allocation
    assert "lower max_new_tokens" in str(err.value)

    monkeypatch.setattr(generate_module, "device_memory", lambda device: 20_000)
    assert len(generate(params, cfg, [[1, 2, 3]], max_new_tokens=61)[0]) == 61  # 64 slots: 16 KiB
    with pytest.raises(
        ValueError, match=r"prompt length 3 \+ max_new_tokens=62 needs .* for 1 prompt"
    ):
        generate(params, cfg, [[1, 2, 3]], max_new_tokens=62)  # 128 slots: 32 KiB
    with pytest.raises(ValueError, match="for 2 prompt"):
        generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=61)

    # RoPE models may run past max_seq_len (64): only memory bounds the length.
    monkeypatch.setattr(generate_module, "device_memory", lambda device: None)
    assert len(generate(params, cfg, [[1] * 60], max_new_tokens=40)[0]) == 40

    # An allocation that fails anyway names the option to lower too.
    real_init_cache = generate_module.init_cache

    def failing_init_cache(cfg, batch, max_len, *, dtype, device):
        if str(device) == "meta":
            return real_init_cache(cfg, batch, max_len, dtype=dtype, device=device)
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"
        )

    monkeypatch.setattr(generate_module, "init_cache", failing_init_cache)
    with pytest.raises(ValueError, match="KV cache for 1 prompt.* lower max_new_tokens"):
        generate(params, cfg, [[1, 2, 3]], max_new_tokens=5)


def test_bad_options_and_prompts_are_clear_errors():
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    cases = [
        (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
        (dict(top_k=0), "top_k=0 is invalid"),
        (dict(top_p=1.5), "top_p=1.5 is invalid"),
        (dict(max_new_tokens=0), "max_new_tokens=0 is invalid"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0 is invalid"),
        (dict(temperature=float("inf")), r"temperature=inf is invalid: expected a finite float"),
        (dict(temperature=1e39), r"temperature=1e\+39 is invalid"),  # inf as float32
        (dict(repetition_penalty=float("inf")), r"repetition_penalty=inf is invalid"),
        (dict(vocab_limit=0), "vocab_limit=0 is invalid"),
        (dict(seed=-1), r"seed=-1 is invalid: expected an int in \[0, 2\*\*63\)"),
        (dict(seed=2**63), "seed=9223372036854775808 is invalid"),  # not an int64
        (dict(prompt_offset=-1), r"prompt_offset=-1 is invalid: expected an int in \[0, 2\*\*31\)"),
        (dict(seed=1.5), "seed=1.5 is invalid"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(params, cfg, [[1]], **{"max_new_tokens": 2, **options})
    with pytest.raises(ValueError, match="top_k=0 is invalid"):
        stream(params, cfg, [[1]], top_k=0)  # at the call, not at the first step
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty list"):
        generate(params, cfg, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab_size=61"):
        generate(params, cfg, [[1, 61]], max_new_tokens=2)
    gpt2 = CONFIGS["gpt2_like"]
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(PARAMS["gpt2_like"], gpt2, [[1] * 60], max_new_tokens=6)


def test_learned_positions_generate_up_to_max_seq_len_fed_tokens():
    """The last new token is never fed back: prompt + max_new_tokens - 1 positions are used."""
    cfg, params = CONFIGS["gpt2_like"], PARAMS["gpt2_like"]
    prompt = [3, 9, 27, 14, 5, 44, 2] * 8  # 56 of max_seq_len 64
    new_ids = generate(params, cfg, [prompt], max_new_tokens=9)
    assert new_ids == [greedy_without_cache(params, cfg, prompt, 9)]


# --- Text and stop strings --------------------------------------------------------------------
class LetterTokenizer:
    """ids 0..25 -> 'a'..'z', 26 -> ' ', 27 = EOS (decodes to nothing)."""

    eos_id, bos_id, pad_id, vocab_size = 27, None, None, 28

    def encode(self, text):
        return [26 if c == " " else ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join("" if i == 27 else " " if i == 26 else chr(ord("a") + i) for i in ids)


def test_text_row_holds_back_a_possible_stop_string_and_cuts_at_it():
    row = TextRow(LetterTokenizer(), ["cat"])
    pieces = [row.add(t) for t in LetterTokenizer().encode("a cab c")]
    assert pieces == ["a", " ", "", "", "cab", " ", ""]  # "c", "ca" may start "cat"; "cab" does not
    assert row.add(0) == "" and row.add(19) == "" and row.done  # "...c" + "at" -> stop
    assert row.emitted == len("a cab ")
    row = TextRow(LetterTokenizer(), ["zz"])
    assert [row.add(t) for t in (25,)] == [""] and row.finish() == "z"


def test_stop_strings_and_eos_end_text_rows():
    cfg = ModelConfig(**{**BASE, "vocab_size": 28})
    params = sharp_params(cfg, seed=4)
    params["lm_head", "weight"][27] = 0  # the tokenizer's EOS (27) has logit 0: never the argmax
    tok = LetterTokenizer()
    ids = generate(params, cfg, [tok.encode("hello")], max_new_tokens=16)[0]
    free = generate_text(params, cfg, tok, ["hello"], max_new_tokens=16, temperature=0)[0]
    assert free == tok.decode(ids) and 27 not in ids
    eos = ids[5]  # an EOS id ends the row before it (EOS has no text)
    assert generate_text(params, cfg, tok, ["hello"], max_new_tokens=16, eos_id=eos) == [
        tok.decode(ids[: ids.index(eos)])
    ]
    stop = free[8:10]
    expected = free[: free.index(stop)]
    pieces = list(stream_text(params, cfg, tok, ["hello", "abc"], stop=[stop], max_new_tokens=16))
    assert "".join(p for i, p in pieces if i == 0) == expected
    assert generate_text(params, cfg, tok, ["hello"], stop=["zzzzz", stop], max_new_tokens=16) == [
        expected
    ]


# --- Compiled decode --------------------------------------------------------------------------
def check_compiled_decode(name: str, monkeypatch) -> None:
    """Compiled generation == eager generation, with one graph for every step (all guards
    checked at every step) and for a second call with other prompts (same bucket) and seed;
    then the same tokens when later steps check only the guards that tell graphs apart."""
    from torch._dynamo.utils import counters

    cfg, params = CONFIGS[name], PARAMS[name]
    calls = [([[1, 2, 3, 4, 5], [6, 7]], 3), ([[9, 9, 9], [1, 2, 3, 4, 5, 6]], 4)]
    options = dict(max_new_tokens=6, temperature=0.9, top_k=10, top_p=0.9)
    torch._dynamo.reset()
    counters.clear()
    for full_guards in (True, False):
        monkeypatch.setattr(generate_module, "FULL_GUARDS_EVERY_STEP", full_guards)
        for prompts, seed in calls:
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = generate(params, cfg, prompts, compile=True, seed=seed, **options)
            assert counters["stats"]["unique_graphs"] == 1
            assert compiled == generate(params, cfg, prompts, seed=seed, **options)


@pytest.mark.parametrize(
    "name", ["mqa_sliding_window", pytest.param("moe", marks=pytest.mark.slow)]
)
def test_compiled_step_never_recompiles(name, monkeypatch):
    monkeypatch.setattr(generate_module, "COMPILE_BACKEND", "eager")  # dynamo only: fast
    check_compiled_decode(name, monkeypatch)


def test_compiled_generation_is_not_capped_by_the_recompile_limit(monkeypatch):
    """Each batch size is its own graph; past dynamo's per-function recompile limit a shared
    step function would raise (fullgraph=True). The limit is lowered to 2 to show it fast."""
    monkeypatch.setattr(generate_module, "COMPILE_BACKEND", "eager")
    cfg, params = CONFIGS["llama_gqa"], PARAMS["llama_gqa"]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        for batch in (1, 2, 3, 4):
            prompts = [[1, 2, 3]] * batch
            compiled = generate(params, cfg, prompts, max_new_tokens=3, compile=True)
            assert compiled == generate(params, cfg, prompts, max_new_tokens=3)


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager_and_never_recompiles(monkeypatch):
    check_compiled_decode("mqa_sliding_window", monkeypatch)


# --- HF parity --------------------------------------------------------------------------------
def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = torch.tensor([prompt])
    out = model.generate(
        tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=steps, do_sample=False,
        use_cache=True, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def sharpen_hf_attention(model) -> None:
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if any(key in name for key in ("q_proj.weight", "k_proj.weight")):
                weight.mul_(10)
            if "c_attn.weight" in name:  # GPT-2 Conv1D [in, 3·D]: q and k columns
                weight[:, : 2 * model.config.n_embd].mul_(10)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_equals_hf_generate(family):
    transformers = pytest.importorskip("transformers")
    from llmfn.hf import from_hf

    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    model.eval()
    sharpen_hf_attention(model)
    cfg, params = from_hf(model)
    prompts = [[3, 14, 15, 92, 65, 35], [8]]
    with torch.no_grad():
        expected = [hf_greedy(model, p, 20) for p in prompts]
    assert generate(params, cfg, prompts, max_new_tokens=20) == expected
    assert len(set(expected[0])) > 3  # not a degenerate repeat of one token


# --- CLI --------------------------------------------------------------------------------------
def write_text_checkpoint(root: Path, padding: int = 0):
    """A run folder whose model has `padding` more ids than its char tokenizer -> (folder,
    cfg, params, tokenizer). Padding rows get large logits: unmasked, they win every step."""
    from llmfn.checkpoint import save_checkpoint
    from llmfn.config import Config, to_yaml
    from llmfn.data import CharTokenizer

    tokenizer = CharTokenizer.train(["the quick brown fox jumps over the lazy dog. def main():"])
    tokenizer.save(root / "tok")
    cfg = ModelConfig(**{**BASE, "vocab_size": tokenizer.vocab_size + padding})
    params = sharp_params(cfg, seed=2)
    params["lm_head", "weight"][tokenizer.vocab_size :] *= 100
    state = TensorDict({"params": params}, batch_size=[])
    save_checkpoint(
        root / "run", 5, state, config_yaml=to_yaml(Config(model=cfg)), train_state={"step": 5},
        tokenizer_dir=root / "tok",
    )  # fmt: skip
    return root / "run", cfg, params, tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def padded_checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("padded"), padding=30)


def test_cli_streams_the_completion_of_a_prompt(checkpoint, capsys):
    path, cfg, params, tokenizer = checkpoint
    argv = [
        str(path),
        "--prompt",
        "the fox",
        "--max-new-tokens",
        "15",
        "--temperature",
        "0.7",
        "--seed",
        "1",
    ]
    assert main(argv) == 0
    expected = generate_text(
        params, cfg, tokenizer, ["the fox"], max_new_tokens=15, temperature=0.7, top_k=50, seed=1
    )
    assert capsys.readouterr().out == "the fox" + expected[0] + "\n"


def test_cli_prompt_file_batches_and_stop_strings(checkpoint, capsys, tmp_path):
    path, cfg, params, tokenizer = checkpoint
    prompts = ["the", "quick brown", "", "lazy dog"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    argv = [
        str(path),
        "--prompt-file",
        str(tmp_path / "prompts.txt"),
        "--batch-size",
        "2",
        "--temperature",
        "0",
    ]
    free = generate_text(
        params, cfg, tokenizer, ["the", "quick brown", "lazy dog"], max_new_tokens=12, temperature=0
    )
    assert len(free[1]) >= 5
    stop = free[1][3:5]
    assert main([*argv, "--max-new-tokens", "12", "--stop", stop]) == 0
    out = capsys.readouterr().out
    texts = [text.split(stop)[0] for text in free]
    for number, (prompt, text) in enumerate(
        zip(["the", "quick brown", "lazy dog"], texts, strict=True), 1
    ):
        assert f"=== {number}: {prompt}\n{prompt}{text}\n" in out


def test_cli_prompt_file_samples_a_prompt_the_same_whatever_the_batch_size(
    checkpoint, capsys, tmp_path
):
    """Each prompt has its own noise, keyed by (seed, its index in the file): the same prompt 4
    times gives 4 samples, the output does not depend on --batch-size, and prompt i samples as
    generate(..., seed=seed, prompt_offset=i)."""
    path, cfg, params, tokenizer = checkpoint
    prompts = ["the", "the", "a fox", "the", "the quick brown", "the"]
    (tmp_path / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts))
    argv = [str(path), "--prompt-file", str(tmp_path / "prompts.txt")]
    argv += ["--max-new-tokens", "12", "--temperature", "1.0", "--seed", "1"]
    outputs = []
    for batch_size in ("1", "2", "4"):
        assert main([*argv, "--batch-size", batch_size]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    texts = [block.split("\n", 1)[1] for block in outputs[0].split("=== ")[1:]]
    assert len({texts[i] for i in (0, 1, 3, 5)}) == 4  # the same prompt, other noise
    options = dict(max_new_tokens=12, temperature=1.0, top_k=50, seed=1)
    alone = generate_text(params, cfg, tokenizer, ["a fox"], prompt_offset=2, **options)
    assert texts[2] == f"a fox{alone[0]}\n\n"


def test_text_of_a_padded_vocabulary_uses_only_ids_the_tokenizer_decodes(
    padded_checkpoint, capsys, monkeypatch
):
    monkeypatch.setattr(generate_module, "COMPILE_BACKEND", "eager")
    path, cfg, params, tokenizer = padded_checkpoint
    with pytest.raises(ValueError, match="outside"):  # the padding rows are what it would pick
        generate_text(params, cfg, tokenizer, ["the"], max_new_tokens=5, vocab_limit=None)
    options = dict(max_new_tokens=12, temperature=0.9, top_k=50, seed=3)
    text = generate_text(params, cfg, tokenizer, ["the", "fox"], **options)
    assert all(len(t) > 0 for t in text)
    assert generate_text(params, cfg, tokenizer, ["the", "fox"], compile=True, **options) == text
    argv = [str(path), "--prompt", "the", "--max-new-tokens", "12", "--temperature", "0.9"]
    assert main([*argv, "--seed", "3"]) == 0
    assert capsys.readouterr() == ("the" + text[0] + "\n", "")
    assert main([*argv, "--temperature", "0", "--compile"]) == 0
    greedy = generate_text(params, cfg, tokenizer, ["the"], max_new_tokens=12, temperature=0)
    assert capsys.readouterr().out == "the" + greedy[0] + "\n"


def test_cli_error_after_the_prompt_starts_on_a_new_line(checkpoint, capsys, monkeypatch):
    def failing_stream_text(*args, **options):
        yield 0, " quick"
        raise ValueError("something failed mid-stream")

    monkeypatch.setattr(generate_module, "stream_text", failing_stream_text)
    assert main([str(checkpoint[0]), "--prompt", "the"]) == 2
    assert capsys.readouterr() == ("the quick\n", "error: something failed mid-stream\n")


def test_cli_options_are_checked_before_the_prompt_is_echoed(checkpoint, capsys):
    path = str(checkpoint[0])
    assert main([path, "--prompt", "the", "--max-new-tokens", str(10**12)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: generate: prompt length 3 + max_new_tokens=")
    assert err.count("\n") == 1 and "lower max_new_tokens" in err
    cases = [  # each flag named as typed, with what it takes on the command line
        (["--top-p", "1.5"], "--top-p 1.5 is invalid: expected a float in (0, 1]"),
        (["--top-p", "0"], "--top-p 0.0 is invalid: expected a float in (0, 1]"),
        (["--top-k", "-1"], "--top-k -1 is invalid: expected an int >= 0 (0 = off)"),
        (["--temperature", "inf"], "--temperature inf is invalid: expected a finite float >= 0 (0 = greedy)"),
        (["--temperature", "nan"], "--temperature nan is invalid: expected a finite float >= 0 (0 = greedy)"),
        (["--repetition-penalty", "inf"], "--repetition-penalty inf is invalid: expected a finite float > 0 (1 = off)"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 is invalid: expected an int >= 1"),
        (["--seed", "99999999999999999999"], "--seed 99999999999999999999 is invalid: expected an int in [0, 2**63)"),
        (["--seed", "-1"], "--seed -1 is invalid: expected an int in [0, 2**63)"),
        (["--batch-size", "0"], "--batch-size 0 is invalid: expected an int >= 1"),
    ]  # fmt: skip
    for flags, message in cases:
        assert main([path, "--prompt", "the", *flags]) == 2, flags
        assert capsys.readouterr() == ("", f"error: {message}\n")
    assert (
        main([path, "--prompt", "the", "--top-k", "0", "--top-p", "1", "--max-new-tokens", "2"])
        == 0
    )
    assert capsys.readouterr().err == ""  # 0 and 1 turn them off


def test_cli_bad_device_is_one_clear_error(checkpoint, capsys, monkeypatch):
    path = str(checkpoint[0])
    cases = [
        ("tpu", "--device 'tpu' is not a device name: expected auto, cpu, cuda, cuda:N or mps"),
        (
            "cuda:x",
            "--device 'cuda:x' is not a device name: expected auto, cpu, cuda, cuda:N or mps",
        ),
        ("meta", "--device 'meta' is not a device name: expected auto, cpu, cuda, cuda:N or mps"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases.append(("cuda", "--device 'cuda' but no CUDA device is available (use --device cpu)"))
    for device, message in cases:
        assert main([path, "--prompt", "hi", "--device", device]) == 2, device
        assert capsys.readouterr() == ("", f"error: {message}\n")
    assert generate_module.resolve_device("auto", option="--device") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main([path, "--prompt", "hi", "--device", "cuda:2"]) == 2
    assert capsys.readouterr().err == (
        "error: --device 'cuda:2' but this machine has 2 CUDA device(s): cuda:0 to cuda:1\n"
    )


def test_cli_checkpoint_with_a_list_manifest_is_a_checkpoint_error(checkpoint, capsys, tmp_path):
    import shutil

    run = shutil.copytree(checkpoint[0], tmp_path / "run")
    (run / "step_000005" / "manifest.json").write_text("[1]")
    assert main([str(run / "step_000005"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {run / 'step_000005'}: manifest.json is not an llmfn-checkpoint "
        "manifest: expected a JSON object, got a list\n"
    )
    with pytest.warns(UserWarning, match="expected a JSON object"):
        assert main([str(run), "--prompt", "hi"]) == 2
    assert "no valid checkpoint under" in capsys.readouterr().err


def test_cli_bad_checkpoint_path_or_options_are_clear_errors(checkpoint, capsys, tmp_path):
    missing = tmp_path / "missing"
    assert main([str(missing), "--prompt", "hi"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: checkpoint path {missing} does not exist: expected a checkpoint or run folder\n"
    )
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--prompt", "hi"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main([str(checkpoint[0]), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "--top-p 0.0 is invalid" in capsys.readouterr().err


@pytest.mark.parametrize("config_yaml", ["garbage: [", ""])
def test_cli_overwritten_config_yaml_fails_verification_before_it_is_read(
    checkpoint, capsys, tmp_path, config_yaml
):
    import shutil

    step = shutil.copytree(checkpoint[0] / "step_000005", tmp_path / "step_000005")
    size = (step / "config.yaml").stat().st_size
    (step / "config.yaml").write_text(config_yaml)
    assert main([str(step), "--prompt", "hi"]) == 2
    assert capsys.readouterr() == (
        "",
        f"error: checkpoint {step}: file config.yaml has {len(config_yaml)} bytes, manifest.json "
        f"says {size} (size check failed: truncated or overwritten)\n",
    )


def test_cli_damaged_latest_pointer_is_one_clear_error(checkpoint, capsys, tmp_path):
    import shutil

    run = shutil.copytree(checkpoint[0], tmp_path / "run")
    (run / "latest").write_bytes(b"\xff\xfe")
    assert main([str(run / "latest"), "--prompt", "hi"]) == 2
    assert capsys.readouterr() == (
        "",
        f"error: pointer file {run / 'latest'} holds text that is not UTF-8: expected the name "
        "of a step folder (e.g. step_000100)\n",
    )


def test_prompt_characters_the_tokenizer_does_not_know_are_warned_about(checkpoint):
    from llmfn.warning_format import one_line_warning

    path, cfg, params, tokenizer = checkpoint
    options = dict(max_new_tokens=2, temperature=0)
    with pytest.warns(UserWarning) as caught:
        generate_text(params, cfg, tokenizer, ["the", "the 日本語"], **options)
    assert [str(w.message) for w in caught] == [
        "prompt 1: 3 of its 7 tokens are the unknown token (id 1): text the tokenizer's "
        "vocabulary lacks, which the model never sees"
    ]
    with pytest.warns(UserWarning, match="^prompt 6: 3 of its 7 tokens"):  # 2nd of a batch at 5
        generate_text(params, cfg, tokenizer, ["the", "the 日本語"], prompt_offset=5, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_text(params, cfg, tokenizer, ["the fox"], **options)  # known characters
        generate_text(params, cfg, LetterTokenizer(), ["bb"], **options)  # ids 1, no unk_id
    with pytest.warns(UserWarning, match="prompt 0: 3 of its 7 tokens") as caught:
        assert main([str(path), "--prompt", "the 日本語", "--max-new-tokens", "2"]) == 0
    warning = caught[0]  # llmfn's own warning: the CLIs print it as one line
    shown = one_line_warning(warning.message, warning.category, warning.filename, warning.lineno)
    assert shown.startswith("warning: prompt 0: 3 of its 7") and shown.count("\n") == 1


def test_an_hf_tokenizer_with_an_unknown_token_warns_about_words_it_lacks():
    """A WordLevel tokenizer maps a word it lacks to [UNK]: one token for a whole word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmfn.data import BPETokenizer
    from llmfn.streaming_text import encode_prompt

    vocab = {"[UNK]": 0, "the": 1, "fox": 2, "<|endoftext|>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = BPETokenizer(backend)
    assert tokenizer.unk_id == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode_prompt(tokenizer, "the fox", 0) == [1, 2]
    with pytest.warns(UserWarning, match=r"prompt 2: 1 of its 3 tokens are the unknown token"):
        assert encode_prompt(tokenizer, "the quick fox", 2) == [1, 0, 2]
    assert BPETokenizer.train(["the fox"], vocab_size=300).unk_id is None  # byte-level: none


@pytest.mark.slow
def test_python_dash_m_entry_point_streams_text(checkpoint):
    path, cfg, params, tokenizer = checkpoint
    result = subprocess.run(
        [sys.executable, "-m", "llmfn.generate", str(path), "--prompt", "the", "--max-new-tokens", "9"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = generate_text(
        params, cfg, tokenizer, ["the"], max_new_tokens=9, temperature=0.8, top_k=50
    )
    assert result.stdout == "the" + expected[0] + "\n"
    assert "RuntimeWarning" not in result.stderr

    # | head: the reader leaves before the text comes; the CLI ends quietly
    command = [sys.executable, "-m", "llmfn.generate", str(path), "--prompt", "the"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=300) == 0 and "Error" not in stderr and "error" not in stderr


def test_a_regression_checkpoint_is_named_as_such(tmp_path, capsys):
    from llmfn.checkpoint import save_checkpoint
    from llmfn.config import Config, DataConfig, TrainConfig, to_yaml
    from llmfn.tasks import regression

    cfg = Config(train=TrainConfig(task="regression"), data=DataConfig(module="regression"))
    state = TensorDict({"params": regression.init_params(cfg, seed=0), "step": torch.tensor(1)}, [])
    ckpt = save_checkpoint(tmp_path, 1, state, config_yaml=to_yaml(cfg), train_state={"step": 1})
    assert main([str(ckpt), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "holds a regression model (train.task=regression in its config.yaml)" in err
    assert "only language-model checkpoints (lm, sft) can be generated from" in err
