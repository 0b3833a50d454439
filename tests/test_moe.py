"""MoE routing and padding: masked (padding) tokens are left out of the load-balancing and z
losses and take no expert capacity, so real tokens route, drop and score as they would alone
(HF Mixtral's load_balancing_loss_func also leaves padding out)."""

import pytest
import torch

from llmfn.model import forward_cached, forward_with_aux, init_cache, init_params, loss
from llmfn.model_config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = ModelConfig(
    vocab_size=50,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    max_seq_len=64,
    use_moe=True,
    num_experts=4,
    top_k=2,
    intermediate_size=24,
)
PAD = 40
REAL = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(0))
PADDED = torch.cat([torch.zeros(1, PAD, dtype=torch.long), REAL], 1)  # left padding
MASK = torch.cat([torch.zeros(1, PAD), torch.ones(1, 4)], 1).long()

VARIANTS = {
    "dropless": {},
    "capacity 1.0": {"moe_capacity_factor": 1.0},
    "capacity 0.5, top-1, shared": {
        "moe_capacity_factor": 0.5,
        "top_k": 1,
        "num_shared_experts": 1,
    },
    "capacity 1.0, 2 layers, remat": {
        "moe_capacity_factor": 1.0,
        "num_layers": 2,
        "activation_checkpointing": True,
    },
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_changes_no_moe_loss_and_no_real_token_logit(variant):
    """4 real tokens alone vs after 40 masked padding tokens (which, counted, would shift the
    losses and, under a capacity, take the real tokens' expert slots)."""
    cfg = MOE.replace(**VARIANTS[variant])
    params = init_params(cfg, seed=0)
    logits_alone, losses_alone = forward_with_aux(params, REAL, cfg)
    logits_padded, losses_padded = forward_with_aux(params, PADDED, cfg, attention_mask=MASK)
    torch.testing.assert_close(logits_padded[:, PAD:], logits_alone, rtol=1e-5, atol=1e-5)
    assert logits_padded.isfinite().all()
    assert losses_padded.keys() == {"moe_aux_loss", "router_z_loss"}
    for name, value in losses_alone.items():
        torch.testing.assert_close(losses_padded[name], value, rtol=1e-5, atol=1e-6)


def test_padding_is_left_out_of_the_training_loss_and_its_gradient():
    """loss() passes the batch's attention_mask down to the router: the total (ce + weighted
    MoE losses) and the router's gradient match the unpadded batch."""
    cfg = MOE.replace(moe_capacity_factor=1.0, moe_aux_loss_coef=1.0, router_z_loss_coef=1.0)
    params = init_params(cfg, seed=0)
    targets = REAL.roll(-1, 1)
    padded_targets = torch.cat([torch.full((1, PAD), -100), targets], 1)

    def total(p, batch):
        return loss(p, batch, cfg)[0]

    alone = {"inputs": REAL, "targets": targets}
    padded = {"inputs": PADDED, "targets": padded_targets, "attention_mask": MASK}
    grads_alone = torch.func.grad(total)(params, alone)
    grads_padded = torch.func.grad(total)(params, padded)
    torch.testing.assert_close(total(params, padded), total(params, alone))
    router = ("layers", "0", "moe", "router")
    torch.testing.assert_close(grads_padded[router], grads_alone[router], rtol=1e-4, atol=1e-6)


def test_cached_prefill_reads_the_slot_mask_at_its_own_slots():
    """With a cache the mask is over the cache slots, [B, max_len]: a prefill in two calls
    (the padding at slots 0..39, then the real tokens at 40..43) routes like the uncached
    padded forward under a capacity."""
    cfg = MOE.replace(moe_capacity_factor=1.0)
    params = init_params(cfg, seed=0)
    expected = forward_with_aux(params, PADDED, cfg, attention_mask=MASK)[0]
    slot_mask = torch.cat([MASK, torch.zeros(1, 20, dtype=torch.long)], 1)
    cache = init_cache(cfg, 1, slot_mask.shape[1])
    pad_logits, cache = forward_cached(
        params, PADDED[:, :PAD], cfg, cache, torch.tensor(0), attention_mask=slot_mask
    )
    logits, _ = forward_cached(
        params, REAL, cfg, cache, torch.tensor(PAD), attention_mask=slot_mask
    )
    assert pad_logits.isfinite().all()
    torch.testing.assert_close(logits, expected[:, PAD:], rtol=1e-5, atol=1e-5)


def test_an_all_ones_mask_gives_the_unmasked_numbers():
    cfg = MOE.replace(moe_capacity_factor=1.0, num_layers=2)
    params = init_params(cfg, seed=0)
    tokens = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
    logits, losses = forward_with_aux(params, tokens, cfg)
    masked_logits, masked_losses = forward_with_aux(
        params, tokens, cfg, attention_mask=torch.ones(3, 8, dtype=torch.long)
    )
    torch.testing.assert_close(masked_logits, logits, rtol=1e-5, atol=1e-6)
    for name, value in losses.items():
        torch.testing.assert_close(masked_losses[name], value)
