"""Decode throughput: llmfn's compiled KV-cache decode vs HF `generate` (with its cache) on the
same random ~15M Llama, at batch 1 and batch 8, in one run.

    python bench/decode_throughput.py [--threads N] [--new-tokens 128] [--prompt-len 32]

Both sides decode greedily for exactly --new-tokens tokens after a --prompt-len prompt (HF with
min_new_tokens, llmfn with no eos_id) on the same threads. The compile / first call is warm-up and
not timed; each side is then timed --repeats times, interleaved, and the best run is reported
(the machine may be shared). tokens/s = batch · new tokens / wall time of one generate call
(the prefill is included on both sides). llmfn's weights are converted once with `decode_weights`
(contiguous 8-column panels for the panel kernel; the one-time cost is printed), as a model is
loaded once; HF keeps its nn.Linear layout. "matmul floor" is the time of one step's weight
matmuls alone (`llmfn.layers.linear` over every weight matrix at the batch size, in llmfn's
decode layout): what any eager or compiled implementation with the same matmul kernel pays per
token.
"""

from __future__ import annotations

import argparse
import time

import torch


def tiny_llama(vocab_size: int):
    """A random Llama of about 15M parameters (6 layers, width 384)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=6, intermediate_size=1024, max_position_embeddings=1024,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def matmul_floor(params, cfg, batch: int, repeats: int) -> float:
    """Seconds per step of the decode matmuls alone: x [batch, in] @ W.T for every weight
    matrix (the LM head included), best of `repeats` runs of 10 steps."""
    from llmfn.layers.linear import linear

    leaves = params.items(include_nested=True, leaves_only=True)
    weights = [w for key, w in leaves if w.dim() >= 2 and key != ("embed", "weight")]
    if cfg.tie_embeddings:
        weights.append(params["embed", "weight"])  # the LM head
    inputs = [torch.randn(batch, w.shape[1]) for w in weights]  # in: [out, in] or [P, in, 8]
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(10):
            for x, w in zip(inputs, weights, strict=True):
                linear(x, w)
        best = min(best, (time.perf_counter() - start) / 10)
    return best


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=6144)
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads for both sides (default: torch's, all cores; 1 is steadier on a "
        "shared CPU)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llmfn.cached_decode import decode_weights
    from llmfn.generate import generate
    from llmfn.hf import from_hf
    from llmfn.layers.panel_matmul import kernel_available
    from llmfn.model import count_params

    hf_model = tiny_llama(args.vocab_size)
    cfg, hf_params = from_hf(hf_model)
    print(f"model: {count_params(hf_params) / 1e6:.1f}M params, {cfg.num_layers} layers, width "
          f"{cfg.hidden_size}, vocab {cfg.vocab_size}; torch {torch.__version__}, "
          f"{args.threads} threads; {args.prompt_len}-token prompts, {args.new_tokens} new tokens")  # fmt: skip
    print(
        f"{'batch':>5} {'llmfn tok/s':>12} {'HF tok/s':>10} {'ratio':>6}   ms/step: "
        f"{'llmfn':>6} {'HF':>6} {'matmul floor':>12}"
    )
    n = args.new_tokens
    start = time.perf_counter()
    built = kernel_available()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    params = decode_weights(hf_params)
    convert_s = time.perf_counter() - start
    for batch in args.batch_sizes:
        prompts = torch.randint(
            1,
            cfg.vocab_size,
            (batch, args.prompt_len),
            generator=torch.Generator().manual_seed(batch),
        )

        def ours(prompts=prompts):
            return generate(params, cfg, prompts, max_new_tokens=n, compile=True)

        def theirs(prompts=prompts):
            return hf_model.generate(
                prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, use_cache=True, pad_token_id=0,
            )[:, prompts.shape[1]:]  # fmt: skip

        with torch.no_grad():
            warmup = time_call(ours)
            same = ours() == theirs().tolist()
            best_ours = best_theirs = float("inf")
            for _ in range(args.repeats):
                best_ours = min(best_ours, time_call(ours))
                best_theirs = min(best_theirs, time_call(theirs))
            floor = matmul_floor(params, cfg, batch, args.repeats)
        ours_rate, theirs_rate = batch * n / best_ours, batch * n / best_theirs
        print(f"{batch:>5} {ours_rate:>12.1f} {theirs_rate:>10.1f} {ours_rate / theirs_rate:>5.2f}x"
              f"   {1e3 * best_ours / n:>14.2f} {1e3 * best_theirs / n:>6.2f} {1e3 * floor:>12.2f}"
              f"   (compile + first call {warmup:.0f} s; same tokens as HF: {same})")  # fmt: skip
    kernel = f"built/loaded in {build_s:.1f} s" if built else "NOT available (column-major weights)"
    print(f"panel kernel {kernel}; decode_weights {1e3 * convert_s:.0f} ms (once per model)")


if __name__ == "__main__":
    main()
