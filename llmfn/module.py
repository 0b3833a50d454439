"""The parameter tree as an `nn.Module`, for code that needs one (torch.optim, DDP, hooks,
`torch.func.functional_call`, `torch.compile(module)`).

    module = as_module(params, cfg)          # Parameters share storage with `params`
    logits = module(tokens)                  # == llmfn.forward(params, tokens, cfg)
    other = functional_call(module, other_params.flatten_keys(".").to_dict(), (tokens,))
    params = module.tree()                   # back to a TensorDict (same storage)

Why not `tensordict.nn.TensorDictParams`: it registers every leaf on one module under a dotted
name (`_parameters["layers.0.attn.wqkv"]`), and `functional_call` looks names up submodule by
submodule: given another tree it silently ran the module's own weights. As a child module it
would also prefix every key (`params.layers.0...`). `TensorDict.to_module` fills a module that
already has the tree's shape but does not build one; building it is `ParameterTree` below.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from llmfn import model
from llmfn.model_config import ModelConfig


class ParameterTree(nn.Module):
    """A container mirroring a tree: its leaves as Parameters (same storage), its sub-trees as
    child containers, so parameter names are the tree's dotted paths. It has no forward."""

    def __init__(self, tree: TensorDictBase):
        super().__init__()
        for key, value in tree.items():
            if isinstance(value, TensorDictBase):
                self.add_module(key, ParameterTree(value))
            else:
                self.register_parameter(key, nn.Parameter(value))

    def extra_repr(self) -> str:
        own = self.named_parameters(recurse=False)
        return ", ".join(f"{name}: {list(param.shape)}" for name, param in own)


class ModelModule(ParameterTree):
    """An `nn.Module` over a parameter tree whose forward is `llmfn.forward`.

    Parameters are registered under the tree's dotted paths (`layers.0.attn.wqkv`) through
    nested container modules, so `named_parameters()` / `state_dict()` keys equal
    `params.flatten_keys(".")` keys. They share storage with the tree given (no copy): an
    in-place update of either (`torch.optim` steps, `load_state_dict`) is seen by both. Moving
    or casting the module (`.to(...)`) makes new tensors; take `tree()` again afterwards.

    The containers have no forward of their own: the computation is `llmfn.forward` over the
    whole tree, so forward hooks fire on this module only; parameter hooks work everywhere.
    """

    def __init__(self, params: TensorDictBase, cfg: ModelConfig):
        if params.batch_dims:
            raise ValueError(
                f"as_module: params has batch_size={list(params.batch_size)}: expected one "
                "model (batch_size=[]), not a stacked ensemble"
            )
        super().__init__(params)
        self.cfg = cfg

    def _parameter_tree(self) -> TensorDict:
        # named_parameters() also yields the tensors functional_call swapped in.
        named = dict(self.named_parameters(remove_duplicate=False))
        return TensorDict(named, batch_size=[]).unflatten_keys(".")

    def tree(self) -> TensorDict:
        """The parameters as a TensorDict tree of plain tensors sharing their storage (for
        `llmfn.forward`, `llmfn.generate`, `llmfn.checkpoint`)."""
        return self._parameter_tree().detach()

    def forward(self, tokens: torch.Tensor, **options) -> torch.Tensor:
        """tokens: [B, T] -> logits [B, T, V]; options as in `llmfn.forward` (positions,
        attention_mask, training, rng)."""
        return model.forward(self._parameter_tree(), tokens, self.cfg, **options)

    def loss(
        self, batch: dict, *, training: bool = False, rng: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`llmfn.loss` over this module's parameters: batch {"inputs": [B, T], "targets":
        [B, T], optional "attention_mask"} -> (loss, metrics). Under DDP call the wrapper
        (`ddp(tokens)`) instead: DDP averages gradients only of calls through its forward."""
        return model.loss(self._parameter_tree(), batch, self.cfg, training=training, rng=rng)


def as_module(params: TensorDictBase, cfg: ModelConfig) -> ModelModule:
    """`params` (a tree from `init_params`, batch_size=[]) as a `ModelModule` whose Parameters
    share storage with it: `module(tokens)` == `llmfn.forward(params, tokens, cfg)`."""
    return ModelModule(params, cfg)
