"""One AdamW update on a ~15M-parameter llmfn tree: llmfn.optim vs torch.optim, side by side.

    python bench/optim_update.py [--steps 20] [--device cpu] [--compile-torch]
    THP_MEM_ALLOC_ENABLE=1 python bench/optim_update.py   # torch's CPU allocator uses huge pages

Prints the median time per update (params + both moments; grads given) and each variant's
ratio to torch.optim.AdamW(foreach=True). Variants are timed round-robin, one call each per
round, so load from other processes drifts over all of them alike. The functional update
returns fresh trees every step (the old ones are freed), so allocation and first-touch costs
are part of its time; torch.optim updates in place.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import llmfn
from llmfn.optim import adamw, default_decay_mask
from llmfn.tree import leaf_paths

HYPER = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def build_params(device: str):
    cfg = llmfn.ModelConfig(
        vocab_size=8192, hidden_size=320, num_layers=8, num_heads=5, max_seq_len=512
    )
    params = llmfn.init_params(cfg, device=device)
    grads = params.apply(lambda p: torch.randn_like(p) * 1e-3)
    return params, grads


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(runs: dict, rounds: int, device: str) -> dict[str, tuple[float, float]]:
    """{name: (median wall ms, median process CPU ms)} per call, timed round-robin so that load
    drift hits all runs alike. On a shared machine the CPU time is the steadier number."""
    times = {name: ([], []) for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            sync(device)
            times[name][0].append((time.perf_counter() - wall) * 1e3)
            times[name][1].append((time.process_time() - cpu) * 1e3)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


def torch_optim_runner(params, grads, **kind):
    mask = default_decay_mask(params)
    leaves = {path: torch.nn.Parameter(params.get(path).clone()) for path in mask}
    for path, leaf in leaves.items():
        leaf.grad = grads.get(path).clone()
    groups = [
        {"params": [leaves[p] for p in mask if mask[p]], "weight_decay": HYPER["weight_decay"]},
        {"params": [leaves[p] for p in mask if not mask[p]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=3e-4,  # fixed here, so a float does not recompile the compiled variant
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=kind.get("foreach"),
        fused=kind.get("fused"),
    )
    step = torch.compile(opt.step, fullgraph=False) if kind.get("compiled") else opt.step
    return lambda: step()


def functional_runner(params, grads, *, compiled: bool):
    optimizer = adamw(**HYPER)
    update = torch.compile(optimizer.update, fullgraph=True) if compiled else optimizer.update
    state = {"params": params.clone(), "opt": optimizer.init(params), "step": 0}
    lr = torch.tensor(3e-4, device=grads.device)

    def run():
        state["step"] += 1
        step = torch.tensor(state["step"], device=grads.device)
        state["params"], state["opt"] = update(
            state["params"], grads, state["opt"], lr=lr, step=step
        )

    return run


def donated_runner(params, grads):
    """The compiled pure update whose results are copied back into its inputs inside the same
    graph (JAX-style donation): inductor then writes in place, with no fresh trees per step."""
    optimizer = adamw(**HYPER)

    def update_in_place(params, grads, opt_state, lr, step):
        new_params, new_state = optimizer.update(params, grads, opt_state, lr=lr, step=step)
        for old, new in ((params, new_params), (opt_state, new_state)):
            old_leaves = [old.get(key) for key in leaf_paths(old)]
            torch._foreach_copy_(old_leaves, [new.get(key) for key in leaf_paths(old)])

    update = torch.compile(update_in_place, fullgraph=True)
    state = {"params": params.clone(), "opt": optimizer.init(params), "step": 0}
    lr = torch.tensor(3e-4, device=grads.device)

    def run():
        state["step"] += 1
        update(
            state["params"],
            grads,
            state["opt"],
            lr,
            torch.tensor(state["step"], device=grads.device),
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--compile-torch", action="store_true", help="also time torch.compile(torch_opt.step)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params, grads = build_params(args.device)
    print(
        f"params: {llmfn.count_params(params) / 1e6:.1f}M in {len(list(params.keys(True, True)))} leaves, "
        f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
    )
    variants = {
        "torch.optim.AdamW foreach (eager)": lambda: torch_optim_runner(
            params, grads, foreach=True
        ),
        "torch.optim.AdamW fused (eager)": lambda: torch_optim_runner(params, grads, fused=True),
        "llmfn adamw (eager)": lambda: functional_runner(params, grads, compiled=False),
        "llmfn adamw (compiled, fullgraph)": lambda: functional_runner(
            params, grads, compiled=True
        ),
        "llmfn adamw compiled, donated (in place)": lambda: donated_runner(params, grads),
    }
    if args.compile_torch:
        variants["torch.optim.AdamW foreach (compiled)"] = lambda: torch_optim_runner(
            params, grads, foreach=True, compiled=True
        )
    runs, first_call_s = {}, {}
    for name, make in variants.items():
        start = time.perf_counter()
        runs[name] = make()
        for _ in range(1 + args.warmup):  # the first call compiles where compiled
            runs[name]()
        first_call_s[name] = time.perf_counter() - start
    medians = interleaved_medians(runs, args.steps, args.device)
    base_wall, base_cpu = medians["torch.optim.AdamW foreach (eager)"]
    print(
        f"{'':40s} {'wall ms':>9s} {'ratio':>6s} {'cpu ms':>9s} {'ratio':>6s}   (ratios vs torch foreach)"
    )
    for name, (wall, cpu) in medians.items():
        print(
            f"{name:40s} {wall:9.2f} {wall / base_wall:6.2f} {cpu:9.2f} {cpu / base_cpu:6.2f}"
            f"   build + warmup {first_call_s[name]:5.1f} s"
        )


if __name__ == "__main__":
    main()
