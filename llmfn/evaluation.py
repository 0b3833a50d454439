"""What the driver computes from the params between steps: the validation loss (and
perplexity) over every rank's share of the val batches, and text samples.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict

from llmfn.config import Config
from llmfn.distributed import ProcessInfo, sum_over_ranks


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(
    eval_step, params: TensorDict, data, proc: ProcessInfo, *, perplexity: bool
) -> dict[str, float]:
    """Token-weighted validation loss over the data module's val batches, and its perplexity
    where the loss is a token negative log-likelihood (`Task.perplexity`). With several
    processes each evaluates every world_size-th batch and the sums are added up, so the
    result does not depend on the number of processes."""
    total, count = 0.0, 0.0
    for index, batch in enumerate(data.val_batches()):
        if index % proc.world_size != proc.rank:
            continue
        out = eval_step(params, batch_to(batch, proc.device))
        tokens = float(out["tokens"])
        total += float(out["loss"]) * tokens
        count += tokens
    total, count = sum_over_ranks([total, count], proc.device)
    if count == 0:
        return {}
    val_loss = total / count
    if not perplexity:
        return {"val_loss": val_loss}
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def make_sample_fn(config: Config, data, current_params):
    """(prompt, max_new_tokens) -> text from the latest params (`current_params()`), or None."""
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None:
        return None
    from llmfn.generate import generate

    def sample(prompt: str, max_new_tokens: int) -> str:
        ids = (
            tokenizer.encode(prompt)
            if prompt
            else [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
        )
        ids = (
            ids[-(config.model.max_seq_len - max_new_tokens) :]
            if max_new_tokens < config.model.max_seq_len
            else ids[-1:]
        )
        new = generate(
            current_params(),
            config.model,
            [ids],
            max_new_tokens=min(max_new_tokens, config.model.max_seq_len - len(ids)),
            temperature=0.8,
            top_k=40,
            seed=config.train.seed,
            vocab_limit=tokenizer.vocab_size,  # never a padded vocabulary's extra rows
        )
        return prompt + tokenizer.decode(new[0])

    return sample
