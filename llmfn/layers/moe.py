"""Mixture of experts: top-k routing with vectorized dispatch, load-balancing and router z losses,
and optional shared experts.

params: {"router": [E, D], "experts": {"w13": [E, 2·I, D] | "w1": [E, I, D], "w2": [E, D, I]},
"shared": MLP params of width num_shared_experts·I (only when num_shared_experts > 0)}.

Dispatch has no Python loop over tokens or experts: every (token, choice) pair gets a slot in a
[E, C, D] buffer through a cumulative count, the experts run as two batched matmuls, and the
results are gathered back. C = N (an expert sees each token at most once: dropless) unless
`moe_capacity_factor` caps it, in which case pairs past an expert's capacity are skipped (their
weight drops out of the sum).

Padding: given `token_valid` (1 = real token, 0 = padding), padding is left out of everything
routing computes: the aux and z losses are means over the real tokens, the capacity counts the
real tokens only (a 0-d tensor, no host sync; the buffer keeps its static size C), and padding
pairs take no slot (their output is the shared experts' alone, finite and unused).
"""

import math

import torch
from tensordict import TensorDict

from llmfn.layers.init import normal, residual_std
from llmfn.layers.linear import linear
from llmfn.layers.mlp import hidden_activation, init_mlp, mlp, up_names, up_rows
from llmfn.model_config import ModelConfig


def init_moe(cfg: ModelConfig, gen: torch.Generator) -> TensorDict:
    E, D, width = cfg.num_experts, cfg.hidden_size, cfg.ffn_size
    up, _ = up_names(cfg)
    tree = {
        "router": normal((E, D), cfg.init_std, gen),
        "experts": TensorDict(
            {
                up: normal((E, up_rows(cfg, width), D), cfg.init_std, gen),
                "w2": normal((E, D, width), residual_std(cfg), gen),
            },
            batch_size=[],
        ),
    }
    if cfg.num_shared_experts:
        tree["shared"] = init_mlp(cfg, gen, width=cfg.num_shared_experts * width)
    return TensorDict(tree, batch_size=[])


def expert_capacity(num_tokens: int, cfg: ModelConfig) -> int:
    pairs = num_tokens * cfg.top_k
    if cfg.moe_capacity_factor is None:
        return num_tokens  # an expert is chosen at most once per token
    return min(num_tokens, max(1, math.ceil(cfg.moe_capacity_factor * pairs / cfg.num_experts)))


def real_capacity(num_real: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """`expert_capacity` of a token count held in a 0-d long tensor (the real tokens of a padded
    batch), computed on the device in float64 like Python's float, without a host sync."""
    if cfg.moe_capacity_factor is None:
        return num_real
    pairs = (num_real * cfg.top_k).double()
    capacity = torch.ceil(cfg.moe_capacity_factor * pairs / cfg.num_experts).long()
    return torch.minimum(num_real, capacity.clamp(min=1))


def token_mean(values: torch.Tensor, token_valid: torch.Tensor | None) -> torch.Tensor:
    """values [N, ...] -> their mean over the tokens [...]; with token_valid [N] (1 = real),
    over the real tokens only (0 when there are none)."""
    if token_valid is None:
        return values.mean(dim=0)
    weights = token_valid.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / weights.sum().clamp(min=1)


def one_hot(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """indices [...] -> [..., num_classes] long. Unlike F.one_hot, no data-dependent check, so
    it works under torch.func.vmap."""
    return (indices[..., None] == torch.arange(num_classes, device=indices.device)).long()


def route(
    router: torch.Tensor,
    x: torch.Tensor,
    cfg: ModelConfig,
    token_valid: torch.Tensor | None = None,
):
    """x: [N, D] -> (weights [N, k], experts [N, k] long, losses dict of 0-d tensors). The
    weights are the chosen experts' router probabilities, renormalised to sum to 1 for k > 1.
    token_valid: [N] (1 = real token, 0 = padding): the losses average over real tokens only."""
    logits = linear(x, router)  # [N, E], in at least float32
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(cfg.top_k, dim=-1)
    if cfg.top_k > 1:  # the chosen experts' weights sum to 1 (Mixtral)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # top_k = 1 keeps the raw probability (Switch Transformer): renormalised it would be exactly
    # 1, and the router would learn nothing from the model's loss, only from the aux losses.
    chosen = one_hot(experts, cfg.num_experts).sum(dim=1).to(probs.dtype)  # [N, E]
    fraction_routed = token_mean(chosen, token_valid) / cfg.top_k
    load_balance = cfg.num_experts * (fraction_routed * token_mean(probs, token_valid)).sum()
    z_loss = token_mean(torch.logsumexp(logits, dim=-1).pow(2), token_valid)
    return weights.to(x.dtype), experts, {"moe_aux_loss": load_balance, "router_z_loss": z_loss}


def run_experts(experts: TensorDict, buffer: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """buffer: [E, C, D] -> [E, C, D], each expert's MLP as one batched matmul."""
    up, _ = up_names(cfg)
    hidden = hidden_activation(cfg)(torch.bmm(buffer, experts[up].transpose(1, 2)))
    return torch.bmm(hidden, experts["w2"].transpose(1, 2))


def kept_pairs(
    flat_expert: torch.Tensor, capacity: int, cfg: ModelConfig, pair_valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """flat_expert [N·k] (token-major: earlier tokens win a full expert) -> (rank_in_expert
    [N·k] long, kept [N·k] bool: the pair has a slot below its expert's capacity). pair_valid
    [N·k] (False = a padding token's pair): such pairs are not counted and not kept, and the
    capacity is that of the real tokens (`real_capacity`)."""
    routed = one_hot(flat_expert, cfg.num_experts)  # [N·k, E]
    if pair_valid is not None:
        routed = routed * pair_valid[:, None]
    rank_in_expert = (routed.cumsum(dim=0) - 1).gather(1, flat_expert[:, None]).squeeze(1)
    if pair_valid is None:
        return rank_in_expert, rank_in_expert < capacity
    num_real = pair_valid.sum() // cfg.top_k
    return rank_in_expert, pair_valid & (rank_in_expert < real_capacity(num_real, cfg))


def moe(
    params: TensorDict,
    x: torch.Tensor,
    cfg: ModelConfig,
    token_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """x: [B, T, D] -> ([B, T, D], {"moe_aux_loss", "router_z_loss"}). token_valid: [B, T]
    (1 = real token, 0 = padding), or None when every token is real."""
    B, T, D = x.shape
    tokens = x.reshape(B * T, D)
    N, E, k = B * T, cfg.num_experts, cfg.top_k
    capacity = expert_capacity(N, cfg)
    valid = None if token_valid is None else token_valid.reshape(N).bool()
    weights, experts, losses = route(params["router"], tokens, cfg, valid)

    flat_expert = experts.reshape(-1)  # [N·k]
    pair_valid = None if valid is None else valid.repeat_interleave(k)
    rank_in_expert, kept = kept_pairs(flat_expert, capacity, cfg, pair_valid)
    overflow_slot = E * capacity  # one spare row receives every skipped pair
    slot = torch.where(kept, flat_expert * capacity + rank_in_expert, overflow_slot)

    sources = tokens.repeat_interleave(k, dim=0)  # [N·k, D]
    buffer = tokens.new_zeros(E * capacity + 1, D).index_add(0, slot, sources)
    outputs = run_experts(params["experts"], buffer[:-1].view(E, capacity, D), cfg)
    outputs = torch.cat([outputs.reshape(E * capacity, D), outputs.new_zeros(1, D)])
    pair_weights = (weights.reshape(-1) * kept).unsqueeze(1)  # [N·k, 1]
    combined = (outputs[slot] * pair_weights).view(N, k, D).sum(dim=1)
    if "shared" in params:
        combined = combined + mlp(params["shared"], tokens, cfg)
    return combined.view(B, T, D), losses
