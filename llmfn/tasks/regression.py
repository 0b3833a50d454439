"""The seed's synthetic regression task: a small MLP fit with mean squared error.

params: layers/{i}/{weight [out, in], bias [out]}; widths: features -> hidden (num_layers
times, GELU between) -> 1. Uses model.hidden_size, model.num_layers and data.regression_features.
"""

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from llmfn.tasks.base import Task


def init_params(config, seed: int) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    widths = (
        [config.data.regression_features]
        + [config.model.hidden_size] * config.model.num_layers
        + [1]
    )
    layers = {}
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        weight = torch.randn((fan_out, fan_in), generator=gen) / fan_in**0.5
        layers[str(i)] = TensorDict({"weight": weight, "bias": torch.zeros(fan_out)}, [])
    return TensorDict({"layers": TensorDict(layers, [])}, [])


def predict(params: TensorDict, x: torch.Tensor) -> torch.Tensor:
    """x: [B, features] -> [B, 1]."""
    names = list(params["layers"].keys())
    for i, name in enumerate(names):
        layer = params["layers", name]
        x = F.linear(x, layer["weight"], layer["bias"])
        if i < len(names) - 1:
            x = F.gelu(x)
    return x


def regression_loss(params, batch, config, *, training: bool = False, rng=None):
    error = F.mse_loss(predict(params, batch["x"]).float(), batch["y"].float())
    examples = torch.tensor(batch["x"].shape[0], device=batch["x"].device)
    return error, {"mse": error.detach(), "tokens": examples}


REGRESSION = Task("regression", init_params, regression_loss, batch_keys=("x", "y"))
