"""One AdamW update on a ~15M-parameter llmfn tree: llmfn.optim vs torch.optim, side by side.

    python bench/optim_update.py [--steps 20] [--device cpu] [--compile-torch]

Prints the median time per update (params + both moments; grads given) and each variant's
ratio to torch.optim.AdamW(foreach=True). The functional update returns fresh trees every step
(the old ones are freed), so allocation and first-touch costs are part of its time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llmfn
from llmfn.optim import adamw, default_decay_mask

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


def median_ms(run, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
        lr=torch.tensor(3e-4) if kind.get("compiled") else 3e-4,
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
        state["params"], state["opt"] = update(
            state["params"],
            grads,
            state["opt"],
            lr=lr,
            step=torch.tensor(state["step"], device=grads.device),
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--compile-torch", action="store_true", help="also time torch.compile(torch_opt.step)"
    )
    args = parser.parse_args()

    params, grads = build_params(args.device)
    print(
        f"params: {llmfn.count_params(params) / 1e6:.1f}M in {len(list(params.keys(True, True)))} leaves, "
        f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}"
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
    }
    if args.compile_torch:
        variants["torch.optim.AdamW foreach (compiled)"] = lambda: torch_optim_runner(
            params, grads, foreach=True, compiled=True
        )
    baseline = None
    for name, make in variants.items():
        start = time.perf_counter()
        run = make()
        run()  # first call: compiles where compiled
        first_s = time.perf_counter() - start
        ms = median_ms(run, args.steps, args.warmup, args.device)
        baseline = baseline or ms
        print(
            f"{name:40s} {ms:8.2f} ms/update   x{ms / baseline:5.2f} vs torch foreach   (first call {first_s:5.1f} s)"
        )


if __name__ == "__main__":
    main()
