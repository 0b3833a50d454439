"""Starting a run from another run's weights: the params come over (cast to the run's dtype),
the context and runtime-only fields may change, a field that changes the params is refused."""

import pytest
import torch

from llmfn import ModelConfig, init_params
from llmfn.checkpoint import CheckpointError, save_params_folder
from llmfn.checkpoint.initial_params import load_initial_params
from llmfn.config import Config, to_yaml

CFG = ModelConfig(
    vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16
)


def saved_weights(tmp_path, cfg: ModelConfig = CFG, dtype=torch.bfloat16):
    params = init_params(cfg, seed=3, dtype=dtype)
    folder = save_params_folder(tmp_path / "export", params, config_yaml=to_yaml(Config(model=cfg)))
    return folder, params


def test_the_params_come_over_cast_with_a_longer_context_and_dropout(tmp_path):
    folder, saved = saved_weights(tmp_path)
    running = CFG.replace(max_seq_len=64, rope_theta=50_000.0, dropout=0.1)
    template = init_params(running, seed=0)
    loaded, read = load_initial_params(tmp_path / "export", running, template)
    assert loaded is template and read == folder
    for key, value in saved.items(include_nested=True, leaves_only=True):
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.float()), key


def test_a_field_that_changes_the_params_is_refused_naming_it(tmp_path):
    saved_weights(tmp_path)
    running = CFG.replace(hidden_size=64, tie_embeddings=True)
    with pytest.raises(CheckpointError) as err:
        load_initial_params(tmp_path / "export", running, init_params(running))
    assert "its params cannot start this model" in str(err.value)
    assert "model.hidden_size: checkpoint has 32, this run has 64" in str(err.value)
    assert "model.tie_embeddings: checkpoint has False, this run has True" in str(err.value)


def test_learned_positions_keep_their_table_size(tmp_path):
    learned = CFG.replace(position="learned")
    saved_weights(tmp_path, learned)
    running = learned.replace(max_seq_len=32)
    with pytest.raises(
        CheckpointError, match="model.max_seq_len: checkpoint has 16, this run has 32"
    ):
        load_initial_params(tmp_path / "export", running, init_params(running))


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_initial_params(tmp_path / "nowhere", CFG, init_params(CFG))
