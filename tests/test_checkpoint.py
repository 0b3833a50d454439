"""Checkpoints: bitwise round trip into a template, manifest, corruption, resume, keep-N, kill -9."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensordict import TensorDict

import llmfn.data
from llmfn import ModelConfig, forward, init_params
from llmfn.checkpoint import (
    CheckpointError,
    best_checkpoint,
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_for_inference,
    mark_best,
    save_checkpoint,
    step_of,
    verify_checkpoint,
)
from llmfn.config import Config, to_yaml

CFG = ModelConfig(
    vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16
)
CONFIG_YAML = to_yaml(Config(model=CFG))


def make_state(seed: int = 0, *, step: int = 7) -> TensorDict:
    """A train-state-like tree with mixed dtypes, 0-d leaves and a byte RNG state."""
    params = init_params(CFG, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "params": params,
            "opt_state": {
                "mu": params.apply(lambda p: torch.randn(p.shape, generator=gen)),
                "nu": params.apply(lambda p: torch.rand(p.shape, generator=gen).to(torch.bfloat16)),
            },
            "step": torch.tensor(step),
            "rng": torch.tensor(1234 + seed, dtype=torch.long),
            "loss_scale": torch.tensor(65536.0),
            "torch_rng": torch.Generator().manual_seed(seed).get_state(),  # uint8 [5056]
        },
        batch_size=[],
    )


def leaves(tree: TensorDict) -> dict:
    return dict(tree.items(include_nested=True, leaves_only=True))


def save(root: Path, step: int, state: TensorDict | None = None, **options) -> Path:
    state = make_state(step=step) if state is None else state
    return save_checkpoint(
        root, step, state, config_yaml=CONFIG_YAML, train_state={"step": step}, **options
    )


# --- round trip -----------------------------------------------------------------------------------
def test_round_trip_is_bitwise_and_keeps_the_template_metadata(tmp_path):
    state = make_state(seed=0, step=42)
    train_state = {
        "step": 42,
        "tokens_seen": 1.5e9,
        "best_val_loss": float("inf"),
        "data": {"epoch": 2, "index": 17},
    }
    path = save_checkpoint(tmp_path, 42, state, config_yaml=CONFIG_YAML, train_state=train_state)
    assert path == tmp_path / "step_000042"

    template = make_state(seed=1, step=0)  # different values, same structure
    order_before = list(leaves(template))
    ids_before = {key: id(leaf) for key, leaf in leaves(template).items()}
    loaded, loaded_train_state = load_checkpoint(path, template, expected_model=CFG)

    assert loaded is template
    assert loaded_train_state == train_state
    assert list(leaves(loaded)) == order_before  # key order is the template's, not sorted
    for key, leaf in leaves(loaded).items():
        original = leaves(state)[key]
        assert type(leaf) is torch.Tensor and id(leaf) == ids_before[key]
        assert leaf.dtype == original.dtype and leaf.shape == original.shape
        assert torch.equal(leaf, original), key
    assert loaded.device is None or loaded.device == template.device


def test_loaded_state_does_not_recompile_a_compiled_function(tmp_path):
    path = save(tmp_path, 1, make_state(seed=5))

    def total(state: TensorDict) -> torch.Tensor:
        return sum(
            leaf.float().sum() for leaf in state.values(include_nested=True, leaves_only=True)
        )

    compiled = torch.compile(total, backend="eager", fullgraph=True)
    state = make_state()
    compiled(state)
    load_checkpoint(path, state)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(compiled(state), total(make_state(seed=5)))
    # What the template avoids: a tree rebuilt from the files (sorted keys) recompiles.
    stored = {f"params.{k}": v for k, v in load_file(path / "params.safetensors").items()}
    rebuilt = TensorDict({**stored, **load_file(path / "state.safetensors")}, []).unflatten_keys(
        "."
    )
    with (
        pytest.raises(RuntimeError, match="recompile"),
        torch.compiler.set_stance("fail_on_recompile"),
    ):
        compiled(rebuilt)


def test_round_trip_of_shared_and_non_contiguous_leaves(tmp_path):
    weight = torch.randn(4, 6)
    state = TensorDict({"params": {"w": weight, "w_t": weight.t()}, "copy": weight}, [])
    path = save_checkpoint(tmp_path, 1, state, config_yaml=CONFIG_YAML, train_state={})
    template = TensorDict(
        {"params": {"w": torch.zeros(4, 6), "w_t": torch.zeros(6, 4)}, "copy": torch.zeros(4, 6)},
        [],
    )
    load_checkpoint(path, template)
    assert torch.equal(template["params", "w_t"], weight.t()) and torch.equal(
        template["copy"], weight
    )


def test_params_file_alone_is_a_usable_export(tmp_path):
    state = make_state(seed=3)
    path = save(tmp_path, 5, state)
    cfg, params, tokenizer = load_for_inference(path)
    assert cfg == CFG and tokenizer is None
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    assert torch.equal(forward(params, tokens, cfg), forward(state["params"], tokens, CFG))


# --- manifest -------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    (tokenizer_dir / "extra").mkdir(parents=True)
    (tokenizer_dir / "tokenizer.json").write_text('{"model": {}}')
    (tokenizer_dir / "extra" / "merges.txt").write_text("a b\n")
    path = save(tmp_path / "ckpt", 3, tokenizer_dir=tokenizer_dir)

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "llmfn-checkpoint" and manifest["step"] == 3
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {
        "manifest.json"
    }
    assert set(manifest["files"]) == on_disk == {
        "params.safetensors", "state.safetensors", "config.yaml", "train_state.json",
        "tokenizer/tokenizer.json", "tokenizer/extra/merges.txt",
    }  # fmt: skip
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (path / "config.yaml").read_text() == CONFIG_YAML
    assert (path / "tokenizer" / "extra" / "merges.txt").read_text() == "a b\n"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_000003"


def test_load_for_inference_returns_the_checkpoint_tokenizer(tmp_path, monkeypatch):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text('{"model": "fake"}')
    root = tmp_path / "run" / "checkpoints"
    path = save(root, 3, tokenizer_dir=tokenizer_dir)
    seen = []
    monkeypatch.setattr(
        llmfn.data, "load_tokenizer", lambda d: seen.append(Path(d)) or "TOKENIZER", raising=False
    )
    for where in (path, root, tmp_path / "run", root / "latest"):
        assert load_for_inference(where)[2] == "TOKENIZER"
    assert seen == [path / "tokenizer"] * 4


# --- corruption -----------------------------------------------------------------------------------
def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


CORRUPTIONS = {
    "flipped byte": (
        lambda p: flip_byte(p / "params.safetensors"),
        ["params.safetensors", "sha256"],
    ),
    "truncated file": (lambda p: truncate(p / "state.safetensors"), ["state.safetensors", "size"]),
    "missing file": (lambda p: (p / "train_state.json").unlink(), ["train_state.json", "missing"]),
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), ["manifest.json", "missing"]),
    "garbled manifest": (
        lambda p: (p / "manifest.json").write_text("{not json"),
        ["manifest.json", "JSON"],
    ),
    "manifest not an object": (
        lambda p: (p / "manifest.json").write_text("[1]"),
        ["manifest.json", "not an llmfn-checkpoint manifest: expected a JSON object, got a list"],
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_a_clear_error_naming_the_file(tmp_path, case):
    damage, words = CORRUPTIONS[case]
    path = save(tmp_path, 1)
    verify_checkpoint(path)  # fine before the damage
    damage(path)
    template = make_state(seed=9)
    before = leaves(template.clone())
    for attempt in (lambda: verify_checkpoint(path), lambda: load_checkpoint(path, template)):
        with pytest.raises(CheckpointError) as err:
            attempt()
        for word in [str(path), *words]:
            assert word in str(err.value), (word, str(err.value))
    assert all(
        torch.equal(leaf, before[key]) for key, leaf in leaves(template).items()
    )  # untouched


def test_model_config_mismatch_names_the_field_and_both_values(tmp_path):
    path = save(tmp_path, 1)
    running = CFG.replace(hidden_size=64, rope_theta=500000.0)
    with pytest.raises(CheckpointError, match="config.yaml") as err:
        load_checkpoint(path, make_state(), expected_model=running.to_dict())
    message = str(err.value)
    assert "model.hidden_size: checkpoint has 32, running model has 64" in message
    assert "model.rope_theta: checkpoint has 10000.0, running model has 500000.0" in message
    # Runtime-only knobs may change on resume.
    runtime = dict(dropout=0.1, activation_checkpointing=True, moe_aux_loss_coef=0.02)
    load_checkpoint(
        path, make_state(), expected_model=CFG.replace(**runtime, router_z_loss_coef=1e-3)
    )


def test_template_mismatch_names_the_key_and_both_shapes_or_dtypes(tmp_path):
    path = save(tmp_path, 1)
    template = make_state()
    template["opt_state", "mu", "embed", "weight"] = torch.zeros(3, 5)
    with pytest.raises(
        CheckpointError, match=r"'opt_state\.mu\.embed\.weight'.*\(48, 32\).*\(3, 5\)"
    ):
        load_checkpoint(path, template)

    template = make_state()
    template["loss_scale"] = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"'loss_scale'.*F32.*torch\.float64"):
        load_checkpoint(path, template)

    template = make_state()
    template["extra"] = torch.zeros(())
    del template["rng"]
    with pytest.raises(
        CheckpointError, match=r"not in the checkpoint: extra.*not in the template: rng"
    ):
        load_checkpoint(path, template)


def test_bad_save_arguments_are_clear_errors(tmp_path):
    state = make_state()
    with pytest.raises(TypeError, match="train_state must be a JSON-serializable"):
        save_checkpoint(
            tmp_path, 1, state, config_yaml=CONFIG_YAML, train_state={"t": torch.zeros(1)}
        )
    with pytest.raises(ValueError, match="config_yaml must be a run config with a 'model' section"):
        save_checkpoint(tmp_path, 1, state, config_yaml="lr: 3", train_state={})
    with pytest.raises(ValueError, match="step=-1"):
        save(tmp_path, -1, state)
    with pytest.raises(ValueError, match=r"tensor key 'a\.b'"):
        save(tmp_path, 1, TensorDict({"a.b": torch.zeros(1)}, []))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_inference(tmp_path / "nowhere")
    assert list_checkpoints(tmp_path) == [] and not any(tmp_path.iterdir())


# --- resume discovery, pointers, pruning ----------------------------------------------------------
def test_resume_skips_incomplete_and_corrupted_newer_folders_with_a_warning(tmp_path):
    assert find_resume_checkpoint(tmp_path / "missing") is None
    for step in (1, 2, 3):
        save(tmp_path, step)
    flip_byte(tmp_path / "step_000003" / "state.safetensors")
    (tmp_path / ".tmp-step_000004-abc").mkdir()  # an interrupted save
    (tmp_path / ".tmp-step_000004-abc" / "params.safetensors").write_bytes(b"partial")
    (tmp_path / "step_000005").mkdir()  # a folder with no manifest
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "step_000002"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "step_000005" in messages[0] and "manifest.json is missing" in messages[0]
    assert (
        "step_000003" in messages[1]
        and "state.safetensors" in messages[1]
        and "sha256" in messages[1]
    )
    # A run folder or root resolves the same way for inference.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_for_inference(tmp_path)[0] == CFG


@pytest.mark.parametrize("manifest", ["[1]", '"text"', "3", "null"])
def test_resume_skips_a_folder_whose_manifest_is_not_a_json_object(tmp_path, manifest):
    for step in (1, 2):
        save(tmp_path, step)
    (tmp_path / "step_000002" / "manifest.json").write_text(manifest)
    with pytest.warns(UserWarning, match="step_000002.*expected a JSON object") as caught:
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step_000001"
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_for_inference(tmp_path)[0] == CFG  # a run folder or root skips it too


def test_keep_last_n_prunes_old_steps_but_keeps_best_and_latest(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step, keep_last_n=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000020", "step_000030"]
    mark_best(tmp_path, tmp_path / "step_000020")
    for step in (40, 50):
        save(tmp_path, step, keep_last_n=2)
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [20, 40, 50]
    assert best_checkpoint(tmp_path) == tmp_path / "step_000020"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000050"
    assert load_for_inference(tmp_path / "best")[0] == CFG
    # The folder just written survives even when a higher step number exists.
    save(tmp_path, 45, keep_last_n=1)
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [20, 45, 50]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000045"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    with pytest.raises(ValueError, match="not a step folder inside checkpoint root"):
        mark_best(tmp_path, tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("content", "shown"),
    [(b"\xff\xfe", "text that is not UTF-8"), (b"garbage\n", "'garbage'"), (b"", "''")],
)
def test_a_damaged_pointer_is_a_checkpoint_error_naming_it(tmp_path, content, shown):
    from llmfn.checkpoint import resolve_checkpoint

    save(tmp_path, 1)
    (tmp_path / "latest").write_bytes(content)
    message = (
        f"pointer file {tmp_path / 'latest'} holds {shown}: expected the name of a step folder "
        "(e.g. step_000100)"
    )
    for read in (latest_checkpoint, lambda root: resolve_checkpoint(root / "latest")):
        with pytest.raises(CheckpointError) as err:
            read(tmp_path)
        assert str(err.value) == message


def test_a_pointer_to_a_missing_step_folder_names_nothing(tmp_path):
    from llmfn.checkpoint import resolve_checkpoint

    save(tmp_path, 1)
    (tmp_path / "best").write_text("step_000099\n")  # pruned since, or copied without it
    assert best_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="does not name an existing step folder"):
        resolve_checkpoint(tmp_path / "best")


def test_saving_a_step_again_replaces_it_and_named_saves_are_side_copies(tmp_path):
    save(tmp_path, 5, make_state(seed=0, step=5))
    path = save(tmp_path, 5, make_state(seed=1, step=5))
    template = make_state(seed=2)
    load_checkpoint(path, template)
    assert torch.equal(
        template["params", "embed", "weight"], make_state(seed=1)["params", "embed", "weight"]
    )

    side = save(tmp_path, 6, name="nonfinite_step_000006", keep_last_n=1)
    assert side == tmp_path / "nonfinite_step_000006" and verify_checkpoint(side)["step"] == 6
    assert latest_checkpoint(tmp_path) == path and find_resume_checkpoint(tmp_path) == path


# --- kill -9 during save --------------------------------------------------------------------------
def small_state(step: int) -> TensorDict:
    """A fast-to-save state (~300 KB) whose values encode its step."""
    return TensorDict(
        {"params": {"w": torch.full((256, 256), float(step)), "b": torch.arange(64.0) + step},
         "opt_state": {"m": torch.full((128, 128), -float(step))}, "step": torch.tensor(step)},
        [],
    )  # fmt: skip


def save_forever(root: Path, first_step: int) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: run serially
    step = first_step
    while True:
        save_checkpoint(
            root,
            step,
            small_state(step),
            config_yaml=CONFIG_YAML,
            train_state={"step": step},
            keep_last_n=2,
        )
        step += 1


def test_sigkill_during_save_always_leaves_a_loadable_checkpoint(tmp_path):
    """Kill a saving child at random times, at least 20 times and until the kills have covered
    more saves than trials and landed inside one (a busy machine saves fewer per kill)."""
    trials, killed_mid_save = 20, 0
    rng = random.Random(0)
    save_checkpoint(tmp_path, 0, small_state(0), config_yaml=CONFIG_YAML, train_state={"step": 0})
    context = multiprocessing.get_context("fork")  # the child starts instantly with torch loaded
    step, kills, deadline = 0, 0, time.monotonic() + 120
    while kills < trials or (
        (step <= trials or not killed_mid_save) and time.monotonic() < deadline
    ):
        kills += 1
        child = context.Process(target=save_forever, args=(tmp_path, step + 1), daemon=True)
        child.start()
        try:
            time.sleep(rng.uniform(0.02, 0.25))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        assert child.exitcode == -signal.SIGKILL
        killed_mid_save += any(p.name.startswith(".tmp-step") for p in tmp_path.iterdir())

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an atomic save never leaves an invalid step folder
            found = find_resume_checkpoint(tmp_path)
        assert found is not None and step_of(found) >= step
        template, train_state = load_checkpoint(found, small_state(-1))
        step = step_of(found)
        assert train_state == {"step": step}
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                leaves(template).values(), leaves(small_state(step)).values(), strict=True
            )
        )
        latest = latest_checkpoint(tmp_path)
        assert latest is not None and verify_checkpoint(latest)["step"] == step_of(latest)
    assert killed_mid_save >= 1, "no kill landed inside a save: the test did not exercise anything"
    assert step > trials, "the child saved too few checkpoints to test anything"


def test_resolve_checkpoint_says_what_a_bad_path_is(tmp_path):
    from llmfn.checkpoint import resolve_checkpoint

    with pytest.raises(CheckpointError, match=r"checkpoint path .*nope does not exist: expected"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint path .*weights.bin is a file: expected"):
        resolve_checkpoint(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match=r"holds no checkpoint: expected manifest.json"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "run-a" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"it holds run folders: the newest is .*run-a\)"):
        resolve_checkpoint(tmp_path)  # the runs/ folder rather than one run


def test_a_checkpoint_folder_gets_the_umask_mode_not_a_temporary_folders_0700(tmp_path):
    before = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path, 1, make_state(), config_yaml=CONFIG_YAML, train_state={})
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == 0o755


# --- what a damaged config.yaml reads as ----------------------------------------------------------
@pytest.mark.parametrize("config_yaml", ["garbage: [", ""])
def test_initial_params_verify_the_checkpoint_before_reading_its_config(tmp_path, config_yaml):
    from llmfn.checkpoint.initial_params import load_initial_params

    path = save(tmp_path, 1)
    (path / "config.yaml").write_text(config_yaml)
    with pytest.raises(CheckpointError, match=r"file config.yaml has .* \(size check failed"):
        load_initial_params(path, CFG, init_params(CFG))


def test_config_yaml_that_is_not_yaml_is_one_line_naming_where(tmp_path):
    from llmfn.checkpoint import read_run_config

    (tmp_path / "config.yaml").write_text("model:\n  hidden_size: [\n")
    with pytest.raises(CheckpointError) as err:
        read_run_config(tmp_path)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"checkpoint {tmp_path}: config.yaml cannot be read as YAML: ")
    assert str(err.value).endswith("(line 3, column 1)")


def test_params_folder_into_an_existing_file_says_it_is_a_file(tmp_path):
    from llmfn.checkpoint import save_params_folder

    (tmp_path / "weights").write_text("mine")
    with pytest.raises(ValueError, match="output folder .*weights is a file: expected a new or"):
        save_params_folder(tmp_path / "weights", init_params(CFG), config_yaml=CONFIG_YAML)
