"""Language modelling: next-token cross-entropy over the decoder (padding ignored via -100).

SFT is the same objective; its data module masks the prompt tokens with -100."""

from llmfn import model
from llmfn.tasks.base import Task


def init_params(config, seed: int):
    return model.init_params(config.model, seed=seed)


def lm_loss(params, batch, config, *, training: bool = False, rng=None):
    return model.loss(params, batch, config.model, training=training, rng=rng)


TEXT = {"batch_keys": ("inputs", "targets"), "generates_text": True, "perplexity": True}
LM = Task("lm", init_params, lm_loss, **TEXT)
SFT = Task("sft", init_params, lm_loss, **TEXT)
