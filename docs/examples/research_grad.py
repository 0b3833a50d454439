"""Per-example gradient norms of a tiny llmfn model with torch.func (CPU, a few seconds)."""

import torch

from llmfn import ModelConfig, forward, init_params, loss

cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16)
params = init_params(cfg, seed=0)  # a TensorDict: embed/weight, layers/0/attn/wqkv, ...
tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
logits = forward(params, tokens[:, :-1], cfg)  # [4, 16, 64], a pure function of params


def example_loss(params, inputs, targets):  # one sequence [T] -> scalar next-token loss
    return loss(params, {"inputs": inputs[None], "targets": targets[None]}, cfg)[0]


per_example_grad = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))
grads = per_example_grad(params, tokens[:, :-1], tokens[:, 1:])  # every leaf gains a leading [4]
norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values(True, True)]).norm(dim=0)
print("logits", tuple(logits.shape), "per-example gradient norms", norms.tolist())
