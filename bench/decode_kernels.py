"""The CPU decode kernels against what torch would run instead, side by side in one run:

- the panel matmul (`llmfn.layers.panel_matmul`) against F.linear (MKL) over column-major
  weights and over nn.Linear's row-major ones: every weight matrix of the decode bench's 15.3M
  Llama times x [rows, in], at each --rows;
- the single-query attention (`llmfn.layers.decode_attention`) against SDPA over a cache slice,
  at batch 1 and 8, 6 heads of 64, --keys keys.

    python bench/decode_kernels.py [--threads N] [--rounds 30]

Each round times every variant once, in turn (the machine may be shared); each line shows the
median and the best round and the ratio of medians to the kernel's.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from llmfn.layers.decode_attention import kernel_attention, load_kernel, sdpa
from llmfn.layers.panel_matmul import kernel_available, panel_matmul, panel_weight

# (out, in) of every weight the decode bench's model multiplies per step: 6 layers, the head.
WEIGHTS = [(1152, 384), (384, 384), (2048, 384), (384, 1024)] * 6 + [(6144, 384)]


def one_step(multiply, xs: list, weights: list) -> list:
    return [multiply(x, w) for x, w in zip(xs, weights, strict=True)]


def interleaved(variants: dict, rounds: int) -> dict:
    """{name: (median ms, best ms)} over `rounds` rounds of one call of each variant."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def print_rows(label: str, results: dict, scale: float = 1.0) -> None:
    """One line: each variant's median (best) times `scale`, and its ratio to the first."""
    base = next(iter(results.values()))[0]
    cells = "  ".join(
        f"{name} {scale * median:6.2f} ({scale * best:5.2f}) {median / base:4.2f}x"
        for name, (median, best) in results.items()
    )
    print(f"{label:>14}  {cells}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 256])
    parser.add_argument("--keys", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not kernel_available() or load_kernel() is None:
        raise SystemExit("the decode kernels did not build here (see the warning)")
    print(f"torch {torch.__version__}, {args.threads} threads; per call: median (best) ratio")

    gen = torch.Generator().manual_seed(0)
    row_major = [torch.randn(shape, generator=gen) * 0.05 for shape in WEIGHTS]
    column_major = [w.t().contiguous().t() for w in row_major]
    panels = [panel_weight(w) for w in row_major]
    print("weight matmuls of one step (25 matrices, 15.3M parameters; ms)")
    for rows in args.rows:
        xs = [torch.randn(rows, w.shape[1], generator=gen) for w in row_major]
        variants = {
            "kernel": functools.partial(one_step, panel_matmul, xs, panels),
            "F.linear column-major": functools.partial(one_step, F.linear, xs, column_major),
            "F.linear row-major": functools.partial(one_step, F.linear, xs, row_major),
        }
        print_rows(f"{rows} rows", interleaved(variants, args.rounds))

    print(f"single-query attention over {args.keys} cached keys, 6 heads of 64 (µs)")
    for batch in (1, 8):
        cache = torch.randn(2, batch, 6, args.keys + 64, 64, generator=gen)
        k, v = cache[0, :, :, : args.keys], cache[1, :, :, : args.keys]
        q = torch.randn(batch, 6, 1, 64, generator=gen)
        visible = torch.ones(batch, 1, 1, args.keys, dtype=torch.bool)
        variants = {
            "kernel": lambda q=q, k=k, v=v, m=visible: kernel_attention(q, k, v, m),
            "SDPA": lambda q=q, k=k, v=v, m=visible: sdpa(q, k, v, m),
        }
        print_rows(f"batch {batch}", interleaved(variants, 10 * args.rounds), scale=1e3)


if __name__ == "__main__":
    main()
