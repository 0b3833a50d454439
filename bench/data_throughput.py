"""Batch production speed of every data module: tokens (or examples) per second of
`train_batch(index)` on this machine, single process, one thread of Python.

    python bench/data_throughput.py            # about a minute (prepares small corpora first)
    python bench/data_throughput.py --seconds 1
    python bench/data_throughput.py --prepare-mb 200   # + peak memory of prepare on 200 MB of text

A training step on a CPU consumes ~1e4-1e5 tokens/s, on an H100 ~1e5-1e6; the loader must
stay far above that.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from llmfn.data import (
    RegressionDataModule,
    SFTDataModule,
    StdlibDataModule,
    SyntheticDataModule,
    TokenBinDataModule,
)
from llmfn.data.binarize import FORMAT, FORMAT_VERSION


def fake_bins(folder: Path, num_tokens: int, vocab_size: int = 50_257) -> Path:
    """A token-bin folder of random uint16 ids (the loader does not care what they mean)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rng.integers(0, vocab_size, size=num_tokens, dtype=np.uint16).tofile(folder / "train.bin")
    rng.integers(0, vocab_size, size=num_tokens // 100, dtype=np.uint16).tofile(folder / "val.bin")
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": "uint16",
        "train_tokens": num_tokens,
        "val_tokens": num_tokens // 100,
        "tokenizer": {"vocab_size": vocab_size},  # no tokenizer.json: none is needed here
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def fake_sft(path: Path, count: int) -> Path:
    rows = [
        {"prompt": f"What is {i} times 3? Explain.", "response": f"{i} times 3 is {3 * i}. " * 3}
        for i in range(count)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def fake_text(path: Path, megabytes: int) -> Path:
    """`megabytes` of lines of random words (a 20k-word vocabulary, Zipf-distributed)."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(
        ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20_000)]
    )
    with open(path, "w", encoding="utf-8") as handle:
        while handle.tell() < megabytes * 1_000_000:
            picks = np.minimum(rng.zipf(1.2, size=100_000), len(words)) - 1
            line_ends = rng.random(100_000) < 0.08
            handle.write(
                "".join(
                    w + ("\n" if end else " ")
                    for w, end in zip(words[picks], line_ends, strict=True)
                )
            )
    return path


PEAK_RSS = """
import resource, sys, time
import llmfn.data.prepare as prepare
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
code = prepare.main(sys.argv[1:])
seconds = time.perf_counter() - start
print("RESULT", code, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, seconds)
"""


def prepare_peak_rss(text: Path, tokenizer: str, out: Path) -> tuple[float, float, float]:
    """(peak RSS after imports, peak RSS of the whole run (MiB), seconds) of the prepare CLI."""
    args = [
        "--input",
        str(text),
        "--tokenizer",
        tokenizer,
        "--out",
        str(out),
        "--no-progress",
        "--vocab-size",
        "8192",
    ]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, check=True
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    _, code, base, peak, seconds = line.split()
    assert code == "0", result.stderr
    return int(base) / 1024, int(peak) / 1024, float(seconds)


def measure(module, seconds: float, units_per_batch: int) -> float:
    """Units per second of module.train_batch over consecutive indices for `seconds`."""
    module.train_batch(0)  # warm: memoised epoch permutation, page cache
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        module.train_batch(calls)
        calls += 1
    return calls * units_per_batch / (time.perf_counter() - start)


def ready(module):
    module.prepare()
    with warnings.catch_warnings():  # the fake bins' missing tokenizer is by design
        warnings.filterwarnings("ignore", message=".*no tokenizer to generate text with")
        module.setup(rank=0, world_size=1)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument(
        "--bin-tokens", type=int, default=200_000_000, help="size of the fake token bin"
    )
    parser.add_argument(
        "--prepare-mb",
        type=int,
        default=0,
        help="also measure prepare's peak RSS on this much text",
    )
    args = parser.parse_args()
    if args.prepare_mb:
        with tempfile.TemporaryDirectory() as tmp:
            text = fake_text(Path(tmp) / "corpus.txt", args.prepare_mb)
            size = text.stat().st_size / 1e6
            for tokenizer in ("char", "bpe"):
                base, peak, seconds = prepare_peak_rss(
                    text, tokenizer, Path(tmp) / f"out-{tokenizer}"
                )
                print(
                    f"prepare {size:.0f} MB with {tokenizer}: peak RSS {peak:.0f} MiB "
                    f"(after imports {base:.0f} MiB, +{peak - base:.0f} MiB), {size / seconds:.2f} MB/s"
                )

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bins = fake_bins(tmp / "bins", args.bin_tokens)
        for batch, seq in ((8, 256), (8, 1024), (16, 2048), (64, 2048)):
            module = ready(TokenBinDataModule(bins, seq_len=seq, batch_size=batch))
            rows.append(
                (
                    f"token_bin ({args.bin_tokens / 1e6:.0f}M-token memmap)",
                    batch,
                    seq,
                    measure(module, args.seconds, batch * seq),
                    "tokens",
                )
            )
        stdlib = ready(
            StdlibDataModule(seq_len=256, batch_size=8, progress=False)
        )  # the default cache
        rows.append(
            (
                "stdlib (default: 256 files, bpe 2048)",
                8,
                256,
                measure(stdlib, args.seconds, 8 * 256),
                "tokens",
            )
        )
        synthetic = ready(SyntheticDataModule(vocab_size=256, seq_len=256, batch_size=8))
        rows.append(
            (
                "synthetic (Markov chain)",
                8,
                256,
                measure(synthetic, args.seconds, 8 * 256),
                "tokens",
            )
        )
        sft = ready(
            SFTDataModule(
                fake_sft(tmp / "sft.jsonl", 5000),
                seq_len=256,
                batch_size=8,
                tokenizer="char",
                cache_dir=tmp / "cache",
            )
        )
        rows.append(("sft (packed, char)", 8, 256, measure(sft, args.seconds, 8 * 256), "tokens"))
        regression = ready(RegressionDataModule(features=16, batch_size=256))
        rows.append(("regression", 256, 16, measure(regression, args.seconds, 256), "examples"))

    print(f"{'module':44s} {'batch':>5s} {'seq':>5s} {'per second':>14s}")
    for name, batch, seq, rate, unit in rows:
        print(f"{name:44s} {batch:5d} {seq:5d} {rate / 1e6:10.1f} M {unit}")


if __name__ == "__main__":
    main()
