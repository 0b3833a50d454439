"""Train-step throughput: llmfn's compiled step side by side with the same step eager and with HF
transformers `LlamaForCausalLM` (eager and `torch.compile`d, torch.optim.AdamW), same config, same
batch, in one run. Prints a table of tokens/s, ratios, peak memory and (on GPU) MFU; writes JSON.
HF computes its loss as its Trainer does, inside the model's forward (so compiled with it).
A row `llmfn-module-compiled` trains llmfn's own model the nn.Module way (`llmfn.as_module`,
compiled forward and loss, `loss.backward()`, torch.optim.AdamW): the same model, so the two
llmfn rows compare the functional step with the usual one.

    python bench/train_throughput.py                     # ~15M params, CPU, fp32
    python bench/train_throughput.py --preset llama-135m --batch 16 --seq 2048   # GPU, bf16

Ratios, not absolute times: the machines are shared and noisy. On CPU each variant runs in a
process of its own (its own heap, as in a user's run: sharing one process, HF eager reused the
memory the variant before it had faulted in and looked 20% faster than it runs alone), and the
processes are timed interleaved: one step of each per round, the median of --iters rounds, so
load from other jobs weighs on all alike; a row's ratio to llmfn compiled is the median of the
rounds' ratios, with their interquartile range (how far the machine's noise moved it). On GPU the variants run one after the other in this
process, so that each has its own peak memory, llmfn compiled and HF compiled first; each row is
printed and the JSON rewritten as soon as it is measured, so a run cut short by a time limit
keeps what it measured. Two rows run on GPU only: llmfn's compiled step with the whole
[B·T, V] logits (`llmfn-compiled-full-logits`, third: the Llama-135M preset computes its loss
in chunks of 4096 tokens, `model.loss_chunk_size`), and last, without donating the state
(`llmfn-compiled-pure`): what the chunked loss and the in-place update gain there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import re
import statistics
import time
from pathlib import Path

import torch

from llmfn.config import from_dict
from llmfn.devices import set_determinism
from llmfn.model import count_params, flops_per_token, init_params
from llmfn.module import as_module
from llmfn.optim import build_optimizer
from llmfn.schedule import lr_schedule_from_config
from llmfn.step import init_train_state, make_train_step
from llmfn.tasks import get_task

PRESETS = {
    # ~14.8M parameters (untied head): the CPU comparison point.
    "llama-15m": dict(
        vocab_size=8192,
        hidden_size=320,
        num_layers=6,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1344,
    ),
    # SmolLM-135M shape: the GPU comparison point.
    "llama-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        tie_embeddings=True,
        loss_chunk_size=4096,  # as configs/llama-135m-gpu.yaml: no [B·T, V] logits kept
    ),
}


def run_config(preset: str, seq: int, batch: int, precision: str):
    model = dict(PRESETS[preset], max_seq_len=seq)
    return from_dict(
        {
            "model": model,
            "data": {"module": "synthetic", "batch_size": batch},
            "optim": {
                "lr": 1e-3,
                "min_lr": 1e-4,
                "warmup_steps": 10,
                "weight_decay": 0.1,
                "grad_clip": 1.0,
            },
            "train": {"precision": precision, "max_steps": 1000},
        }
    )


def llmfn_runner(config, device, *, compiled: bool, donate: bool | None = None):
    """The step as the trainer runs it (donate: on CUDA; None = that default)."""
    task = get_task("lm")
    params = init_params(config.model, seed=0, device=device)
    optimizer = build_optimizer(config.optim, params)
    state = init_train_state(params, optimizer, seed=0, precision=config.train.precision)
    step = make_train_step(
        task,
        config,
        optimizer,
        lr_schedule_from_config(config.optim, config.train.max_steps),
        device_type=device.type,
        compile=compiled,
        donate=device.type == "cuda" if donate is None else donate,
    )
    holder = {"state": state}

    def run(batch):
        holder["state"], metrics = step(holder["state"], {k: v[None] for k, v in batch.items()})
        return metrics["loss"]

    return run, count_params(params)


def hf_runner(config, device, *, compiled: bool):
    import transformers

    m = config.model
    hf_config = transformers.LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).to(device)
    model.train()
    forward = torch.compile(model) if compiled else model

    def loss_of(batch):
        # The loss as HF's Trainer computes it: inside the model's forward (so compiled with
        # it); shift_labels are the already-shifted targets, labels only switch the loss on.
        return forward(
            input_ids=batch["inputs"], labels=batch["targets"], shift_labels=batch["targets"]
        ).loss

    run = backward_and_torch_adamw(model, loss_of, device, config.train.precision)
    return run, sum(p.numel() for p in model.parameters())


def module_runner(config, device):
    """llmfn's model trained the nn.Module way: through `llmfn.as_module`, the forward and loss
    compiled, `loss.backward()`, torch.optim.AdamW (fused on CUDA). Against llmfn-compiled it
    shows what the functional step itself costs or gains, the model being the same."""
    module = as_module(init_params(config.model, seed=0, device=device), config.model)
    loss_of = torch.compile(lambda batch: module.loss(batch, training=True)[0])
    run = backward_and_torch_adamw(module, loss_of, device, config.train.precision)
    return run, count_params(module.tree())


def backward_and_torch_adamw(model: torch.nn.Module, loss_of, device, precision: str):
    """A train step as nn.Module code writes it: autocast, `loss_of(batch)`, backward, clip
    to norm 1, torch.optim.AdamW (decay on matrices but embeddings; fused on CUDA)."""
    named = list(model.named_parameters())
    decays = lambda name, p: p.ndim >= 2 and "embed" not in name  # noqa: E731
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": 0.1},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
        foreach=device.type != "cuda",
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def run(batch):
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return run


RUNNERS = {
    "llmfn-compiled": lambda config, device: llmfn_runner(config, device, compiled=True),
    "llmfn-eager": lambda config, device: llmfn_runner(config, device, compiled=False),
    # GPU only (on CPU llmfn-compiled is this): what donating the state gains there
    "llmfn-compiled-pure": lambda c, d: llmfn_runner(c, d, compiled=True, donate=False),
    # GPU only: what the chunked loss (model.loss_chunk_size) gains there
    "llmfn-compiled-full-logits": lambda c, d: llmfn_runner(
        dataclasses.replace(c, model=c.model.replace(loss_chunk_size=0)), d, compiled=True
    ),
    "hf-eager": lambda config, device: hf_runner(config, device, compiled=False),
    "hf-compiled": lambda config, device: hf_runner(config, device, compiled=True),
    "llmfn-module-compiled": module_runner,
}


def make_batch(config, batch: int, seq: int, device) -> dict:
    """The one batch every variant trains on: seeded random tokens, shifted targets."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (batch, seq + 1), generator=gen)
    return {
        "inputs": tokens[:, :-1].contiguous().to(device),
        "targets": tokens[:, 1:].contiguous().to(device),
    }


def measure(run, batch, *, warmup: int, iters: int, device) -> dict:
    """Seconds per step after `warmup` steps (compile happens there), and peak memory on GPU."""
    start = time.perf_counter()
    for _ in range(warmup):
        float(run(batch))
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        loss = run(batch)
    float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_s": seconds, "warmup_s": first, "peak_gib": peak}


def variant_process(connection, name: str, args: dict) -> None:
    """One CPU variant in its own process: build it, warm up, report ("ready", warmup s, params)
    or ("skipped",) when its library is missing, then time one step per "step" message until
    "stop", answered with the peak resident memory of the timed steps."""
    device = torch.device("cpu")
    set_determinism(None, device)  # as the driver: on for a CPU
    config = run_config(args["preset"], args["seq"], args["batch"], args["precision"])
    built = build_variant(name, config, device)
    if built is None:
        connection.send(("skipped",))
        return
    run, n_params = built
    batch = make_batch(config, args["batch"], args["seq"], device)
    start = time.perf_counter()
    for _ in range(args["warmup"]):
        float(run(batch))
    connection.send(("ready", time.perf_counter() - start, n_params))
    reset_peak_rss()
    while connection.recv() == "step":
        start = time.perf_counter()
        float(run(batch))
        connection.send(time.perf_counter() - start)
    connection.send(peak_rss_gib())


def reset_peak_rss() -> None:
    """Start the process's peak resident memory (Linux VmHWM) afresh: the compile's is not the
    step's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float | None:
    """The process's peak resident memory since `reset_peak_rss` (None off Linux)."""
    with contextlib.suppress(OSError):
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20
    return None


def measure_in_processes(names: list[str], args: dict, *, iters: int) -> dict:
    """{variant: stats} for the CPU variants, each in its own process, warmed up one at a time
    (compiles do not overlap), then timed interleaved: `iters` rounds of one step each."""
    context = multiprocessing.get_context("spawn")
    workers, results = {}, {}
    try:
        for name in names:
            ours, theirs = context.Pipe()
            process = context.Process(target=variant_process, args=(theirs, name, args))
            process.start()
            theirs.close()  # the worker's end: so that its exit reads as EOF here
            try:
                reply = ours.recv()
            except EOFError:
                process.join()
                raise SystemExit(
                    f"{name}: its process failed (exit code {process.exitcode}; traceback above)"
                ) from None
            if reply[0] == "ready":
                workers[name] = (process, ours)
                results[name] = {"warmup_s": reply[1], "params": reply[2], "peak_gib": None}
            else:
                process.join()
        times = {name: [] for name in workers}
        for _ in range(iters):
            for name, (_, connection) in workers.items():
                connection.send("step")
                times[name].append(connection.recv())
        for name, seconds in times.items():
            results[name]["step_s"] = statistics.median(seconds)
            results[name]["round_s"] = seconds
    finally:
        for name, (process, connection) in workers.items():
            connection.send("stop")
            with contextlib.suppress(EOFError):
                results[name]["peak_gib"] = connection.recv()
            process.join()
    return results


def build_variant(name: str, config, device):
    """(run, parameter count), or None with a note when the variant's library is missing."""
    try:
        return RUNNERS[name](config, device)
    except ImportError as err:
        print(f"skipping {name}: {err}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-15m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="default: bf16 on GPU, fp32 on CPU",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="subset of: llmfn-compiled llmfn-eager hf-eager hf-compiled llmfn-module-compiled "
        "llmfn-compiled-full-logits llmfn-compiled-pure (the last two run by default on GPU only)",
    )
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    config = run_config(args.preset, args.seq, args.batch, precision)
    tokens_per_step = args.batch * args.seq
    flops = flops_per_token(config.model, args.seq)
    peak = 989e12 if device.type == "cuda" else None

    gpu_only = ("llmfn-compiled-full-logits", "llmfn-compiled-pure")
    default = [n for n in RUNNERS if device.type == "cuda" or n not in gpu_only]
    selected = [name for name in RUNNERS if name in (args.only or default)]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = Report(args, precision, device_name, tokens_per_step, flops, peak)
    if device.type == "cuda":
        set_determinism(None, device)  # as the driver: off on a GPU (inductor autotunes)
        # One at a time, so that each has its own peak memory; the rows the GPU targets compare
        # first, and each row printed and saved as it is measured, so that a run stopped by a
        # time limit still leaves them.
        batch = make_batch(config, args.batch, args.seq, device)
        for name in sorted(selected, key=GPU_ORDER.index):
            if built := build_variant(name, config, device):
                run, n_params = built
                stats = measure(run, batch, warmup=args.warmup, iters=args.iters, device=device)
                report.add(name, {**stats, "params": n_params}, show=True)
                del run, built
                torch.cuda.empty_cache()
    else:
        shape = {"preset": args.preset, "seq": args.seq, "batch": args.batch}
        variant_args = {**shape, "precision": precision, "warmup": args.warmup}
        for name, stats in measure_in_processes(selected, variant_args, iters=args.iters).items():
            report.add(name, stats)
    report.print_table()


def ratio_to(base: dict, stats: dict) -> dict:
    """llmfn compiled's speed over a row's. With per-round times (CPU: each round times every
    variant once, back to back, so the machine's drift over the run cancels) the median of the
    rounds' ratios and their interquartile range; else the ratio of the step times."""
    theirs, ours = stats.get("round_s"), base.get("round_s")
    if not (theirs and ours) or len(theirs) < 2:
        return {"ratio": stats["step_s"] / base["step_s"]}
    ratios = [t / o for t, o in zip(theirs, ours, strict=True)]
    low, median, high = statistics.quantiles(ratios, n=4)
    return {"ratio": median, "ratio_iqr": [low, high]}


GPU_ORDER = [
    "llmfn-compiled",
    "hf-compiled",
    "llmfn-compiled-full-logits",
    "llmfn-module-compiled",
    "hf-eager",
    "llmfn-eager",
    "llmfn-compiled-pure",
]


class Report:
    """The results so far: rows of tok/s, MFU, peak memory and ratios to llmfn compiled, and
    the JSON file, rewritten at each new row."""

    def __init__(self, args, precision: str, device_name: str, tokens_per_step, flops, peak):
        self.args, self.precision, self.device_name = args, precision, device_name
        self.tokens_per_step, self.flops, self.peak = tokens_per_step, flops, peak
        self.results = {}

    def add(self, name: str, stats: dict, *, show: bool = False) -> None:
        stats["tok_s"] = self.tokens_per_step / stats["step_s"]
        stats["mfu"] = self.flops * stats["tok_s"] / self.peak if self.peak else None
        if name == "llmfn-compiled":
            stats["ratio"] = 1.0
        elif base := self.results.get("llmfn-compiled"):
            stats.update(ratio_to(base, stats))
        self.results[name] = stats
        self.save()
        if show:
            print(self.row(name), flush=True)

    def row(self, name: str) -> str:
        r = self.results[name]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] else "-"
        return f"{name:<28}{r['params']:>12,}{r['tok_s']:>12,.0f}{mfu:>8}{mem:>10}{r['warmup_s']:>10.1f}  {self.ratio(name)}"

    def ratio(self, name: str) -> str:
        r = self.results[name]
        if "ratio" not in r:
            return "-"
        if "ratio_iqr" not in r:
            return f"{r['ratio']:.2f}x"
        low, high = r["ratio_iqr"]
        return f"{r['ratio']:.2f}x ({low:.2f}-{high:.2f})"

    def print_table(self) -> None:
        args = self.args
        print(
            f"\n{args.preset}  B={args.batch} T={args.seq}  {self.precision}  device={self.device_name}"
        )
        print(
            f"{'variant':<28}{'params':>12}{'tok/s':>12}{'MFU':>8}{'peak GiB':>10}{'warmup s':>10}  llmfn-compiled / row"
        )
        for name in self.results:
            print(self.row(name))
        where = "CUDA max allocated" if self.peak else "the process's peak resident memory"
        print(f"peak GiB: {where} over the timed steps")
        if not self.peak:
            print("ratio: the median of the rounds' ratios (interquartile range)")
        print(f"\nwrote {args.out}")

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "preset": self.args.preset,
            "batch": self.args.batch,
            "seq": self.args.seq,
            "precision": self.precision,
            "device": self.device_name,
            "results": self.results,
        }
        out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
