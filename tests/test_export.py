"""`python -m llmfn.export`: HF folders that transformers loads with equal logits, plain safetensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from llmfn import ModelConfig, forward, init_params
from llmfn.checkpoint import load_for_inference, save_checkpoint
from llmfn.config import Config, to_yaml
from llmfn.export import main

transformers = pytest.importorskip("transformers")

LLAMA = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=32,
    rope_theta=500.0,
)


def sharpened_params(cfg: ModelConfig, seed: int = 0) -> TensorDict:
    """Random params with q/k rows scaled x10, so attention is far from uniform and a wrong RoPE
    or head layout shows in the logits."""
    params = init_params(cfg, seed=seed)
    qk_rows = (cfg.num_heads + cfg.kv_heads) * cfg.head_dim
    for i in range(cfg.num_layers):
        params["layers", str(i), "attn", "wqkv"][:qk_rows] *= 10
    return params


def write_checkpoint(
    root: Path, cfg: ModelConfig, params: TensorDict, tokenizer_dir: Path | None = None
) -> Path:
    state = TensorDict(
        {"params": params, "opt_state": {"mu": params.clone()}, "step": torch.tensor(12)}, []
    )
    return save_checkpoint(
        root,
        12,
        state,
        config_yaml=to_yaml(Config(model=cfg)),
        train_state={"step": 12},
        tokenizer_dir=tokenizer_dir,
    )


def hf_tokenizer_dir(path: Path) -> Path:
    """A tiny word-level HF tokenizer folder (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(20)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_hf_export_loads_in_transformers_with_equal_logits(tmp_path, capsys):
    params = sharpened_params(LLAMA)
    root = tmp_path / "run" / "checkpoints"
    write_checkpoint(root, LLAMA, params, tokenizer_dir=hf_tokenizer_dir(tmp_path / "tok"))
    out = tmp_path / "hf"
    assert main([str(tmp_path / "run"), "--format", "hf", "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = forward(params, tokens, LLAMA)
        actual = model(tokens).logits
        wrong_rope = forward(params, tokens, LLAMA.replace(rope_theta=10000.0))
    assert (wrong_rope - expected).abs().max().item() > 1e-2  # the comparison can see a RoPE bug
    assert (actual - expected).abs().max().item() <= 1e-4

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w3 w7 w19")["input_ids"] == [5, 9, 21] and tokenizer.eos_token == "<eos>"


def test_import_hf_brings_an_hf_folder_back_as_llmfn_weights(tmp_path, capsys):
    """export --format hf, then import_hf: the same params and config, the tokenizer with them;
    the folder loads for generation and as a run's initial weights."""
    from llmfn.checkpoint.initial_params import load_initial_params
    from llmfn.import_hf import main as import_main

    params = sharpened_params(LLAMA)
    write_checkpoint(
        tmp_path / "run", LLAMA, params, tokenizer_dir=hf_tokenizer_dir(tmp_path / "t")
    )
    assert main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "weights"
    assert import_main([str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"imported {tmp_path / 'hf'} to {out}\n")
    cfg, imported, tokenizer = load_for_inference(out)
    assert cfg.replace(intermediate_size=None) == LLAMA and cfg.ffn_size == LLAMA.ffn_size
    for key, value in params.items(include_nested=True, leaves_only=True):
        assert torch.equal(imported[key], value), key
    assert tokenizer.encode("w3 w7 w19") == [5, 9, 21]
    running = LLAMA.replace(max_seq_len=64, dropout=0.1)
    start, _ = load_initial_params(out, running, init_params(running))
    assert torch.equal(start["embed", "weight"], params["embed", "weight"])


def test_import_hf_errors_name_the_folder(tmp_path, capsys):
    from llmfn.import_hf import main as import_main

    assert import_main([str(tmp_path), "--out", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot import {tmp_path}: {tmp_path} has no config.json: expected a folder "
        "written by save_pretrained\n"
    )
    missing = tmp_path / "nope"
    assert import_main([str(missing), "--out", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot import {missing}: {missing} does not exist: expected a folder "
        "written by save_pretrained\n"
    )


def test_import_hf_refuses_an_unknown_model_type_in_one_line(tmp_path, capsys):
    from llmfn.import_hf import main as import_main

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "foo"}')
    assert import_main([str(tmp_path / "hf"), "--out", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot import {tmp_path / 'hf'}: model_type 'foo' is not supported: expected "
        "llama, mistral, qwen2 or gpt2\n"
    )
    assert not (tmp_path / "w").exists()


def test_import_hf_checks_out_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import llmfn.import_hf
    from llmfn.import_hf import main as import_main

    def no_loading(*args):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(llmfn.import_hf, "read_hf_model", no_loading)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    full, notes = tmp_path / "w", tmp_path / "w" / "notes.txt"
    full.mkdir()
    notes.write_text("mine")
    for out, message in [
        (full, f"--out {full} already exists and is not empty: choose a new folder"),
        (notes, f"--out {notes} is a file: expected a new or empty folder"),
    ]:
        assert import_main([str(tmp_path / "hf"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"error: cannot import {tmp_path / 'hf'}: {message}\n"


def bpe_tokenizer_dir(path: Path) -> Path:
    """llmfn's default BPE (eos <|endoftext|> = 0, pad <|pad|> = 1, no bos), 260 ids."""
    from llmfn.data.bpe_tokenizer import BPETokenizer

    BPETokenizer.train(["hello world, hello there"] * 4, 260).save(path)
    return path


def test_exported_bpe_tokenizer_encodes_special_token_text_as_llmfn_does(tmp_path):
    """Text that spells a special token ("<|endoftext|>") is plain text to llmfn's tokenizer;
    transformers' AutoTokenizer of the exported folder must give the same ids."""
    from llmfn.data.tokenizer import load_tokenizer

    tokenizer_dir = bpe_tokenizer_dir(tmp_path / "tok")
    step = write_checkpoint(
        tmp_path / "ckpt",
        LLAMA.replace(vocab_size=260),
        init_params(LLAMA.replace(vocab_size=260)),
        tokenizer_dir=tokenizer_dir,
    )
    out = tmp_path / "hf"
    assert main([str(step), "--format", "hf", "--out", str(out)]) == 0
    ours = load_tokenizer(tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "hello <|endoftext|> world<|pad|>"
    assert ours.encode(text) != [ours.eos_id]  # the check below compares real text ids
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)


def char_tokenizer_dir(path: Path) -> Path:
    """llmfn's char tokenizer (pad 0, eos 2, no bos): not an HF tokenizer, so not copied."""
    from llmfn.data.char_tokenizer import CharTokenizer

    CharTokenizer.train(["abcabd"]).save(path)
    return path


@pytest.mark.parametrize(
    ("make_tokenizer", "ids"),
    [
        (bpe_tokenizer_dir, {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 1}),
        (hf_tokenizer_dir, {"bos_token_id": None, "eos_token_id": 1, "pad_token_id": None}),
        (char_tokenizer_dir, {"bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0}),
    ],
    ids=["bpe", "hf-word-level", "char"],
)
def test_hf_export_takes_special_token_ids_from_the_tokenizer(
    tmp_path, capsys, make_tokenizer, ids
):
    cfg = LLAMA.replace(vocab_size=260)
    tokenizer_dir = make_tokenizer(tmp_path / "tok")
    step = write_checkpoint(tmp_path / "ckpt", cfg, init_params(cfg), tokenizer_dir=tokenizer_dir)
    out = tmp_path / "hf"
    assert main([str(step), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert {name: config.get(name) for name in ids} == ids
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == ids["eos_token_id"]  # where generate stops
    if (out / "tokenizer.json").is_file():
        assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == ids["eos_token_id"]
    assert "has no tokenizer" not in capsys.readouterr().err


def test_hf_export_without_a_tokenizer_writes_no_token_ids_and_says_so(tmp_path, capsys):
    step = write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    assert main([str(step), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert [config.get(n) for n in ("bos_token_id", "eos_token_id", "pad_token_id")] == [None] * 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: {step} has no tokenizer/" in err
    assert "eos_token_id" in err


def test_hf_export_of_tied_embeddings_in_bfloat16(tmp_path):
    cfg = LLAMA.replace(tie_embeddings=True, num_kv_heads=None)
    params = sharpened_params(cfg, seed=1)
    step = write_checkpoint(tmp_path / "ckpt", cfg, params)
    out = tmp_path / "hf"
    assert main([str(step), "--format", "hf", "--out", str(out), "--dtype", "bfloat16"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(
        model.model.embed_tokens.weight, params["embed", "weight"].bfloat16().float()
    )
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_safetensors_export_is_a_loadable_params_only_checkpoint(tmp_path):
    params = sharpened_params(LLAMA)
    step = write_checkpoint(
        tmp_path / "ckpt", LLAMA, params, tokenizer_dir=hf_tokenizer_dir(tmp_path / "tok")
    )
    out = tmp_path / "weights"
    assert (
        main([str(step), "--format", "safetensors", "--out", str(out), "--dtype", "bfloat16"]) == 0
    )
    assert {p.name for p in out.iterdir()} == {
        "params.safetensors",
        "config.yaml",
        "manifest.json",
        "tokenizer",
    }
    assert (out / "config.yaml").read_text() == (step / "config.yaml").read_text()
    assert json.loads((out / "manifest.json").read_text())["step"] == 12

    cfg, loaded, tokenizer = load_for_inference(out)
    assert cfg == LLAMA and tokenizer is not None and tokenizer.encode("w3 w7") == [5, 9]
    for key, leaf in loaded.items(include_nested=True, leaves_only=True):
        assert leaf.dtype == torch.bfloat16 and torch.equal(leaf, params[key].bfloat16()), key
    tokens = torch.randint(0, LLAMA.vocab_size, (1, 8))
    assert torch.equal(forward(loaded, tokens, cfg), forward(params.bfloat16(), tokens, LLAMA))


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (
            lambda ckpt, out: [str(ckpt.parent / "missing"), "--format", "hf", "--out", str(out)],
            "does not exist",
        ),
        (
            lambda ckpt, out: [str(ckpt.parent.parent), "--format", "hf", "--out", str(out)],
            "holds no checkpoint",
        ),
        (lambda ckpt, out: [str(ckpt), "--format", "hf", "--out", str(ckpt)], "not empty"),
        (
            lambda ckpt, out: [str(ckpt), "--format", "hf", "--out", str(ckpt / "config.yaml")],
            "--out {ckpt}/config.yaml is a file: expected a new or empty folder",
        ),
        (
            lambda ckpt, out: [
                str(ckpt),
                "--format",
                "hf",
                "--out",
                str(ckpt / "config.yaml" / "sub"),
            ],
            "is inside {ckpt}/config.yaml, which is a file: choose a folder path",
        ),
        (
            lambda ckpt, out: [
                str(ckpt),
                "--format",
                "safetensors",
                "--out",
                str(ckpt / "config.yaml" / "a" / "b"),
            ],
            "which is a file",
        ),
        (
            lambda ckpt, out: [
                str(ckpt),
                "--format",
                "safetensors",
                "--out",
                str(out),
                "--family",
                "gpt2",
            ],
            "--family",
        ),
    ],
)
def test_bad_paths_and_arguments_are_clear_errors(tmp_path, capsys, make_args, message):
    ckpt = write_checkpoint(tmp_path / "run" / "ckpt", LLAMA, init_params(LLAMA))
    out = tmp_path / "out"
    assert main(make_args(ckpt, out)) == 2
    err = capsys.readouterr().err
    assert message.format(ckpt=ckpt) in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("fmt", "module", "writer"),
    [("hf", "llmfn.hf", "save_hf_pretrained"), ("safetensors", "llmfn.checkpoint.writing", "_write_tensors")],
)  # fmt: skip
def test_os_errors_while_writing_name_the_out_folder(
    tmp_path, capsys, monkeypatch, fmt, module, writer
):
    def no_space(*args, **kwargs):  # names the file it writes: a temporary one for safetensors
        raise OSError(
            28, "No space left on device", str(args[0] if fmt == "safetensors" else args[2])
        )

    ckpt = write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    monkeypatch.setattr(sys.modules[module], writer, no_space)
    out = tmp_path / fmt
    assert main([str(ckpt), "--format", fmt, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot export {ckpt} as {fmt}: --out '{out}' cannot be written: No space left on device\n"
    )


def test_an_empty_or_current_out_folder_is_refused(tmp_path, capsys, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out, message in [("", "--out is empty"), (".", "--out . is the current folder")]:
        assert main([str(ckpt), "--format", "safetensors", "--out", out]) == 2
        assert message in capsys.readouterr().err
    assert not list((tmp_path / "here").iterdir())


def test_a_regression_checkpoint_is_named_as_such(tmp_path, capsys):
    from llmfn.config import DataConfig, TrainConfig
    from llmfn.tasks import regression

    cfg = Config(
        model=LLAMA, train=TrainConfig(task="regression"), data=DataConfig(module="regression")
    )
    state = TensorDict({"params": regression.init_params(cfg, seed=0), "step": torch.tensor(1)}, [])
    ckpt = save_checkpoint(
        tmp_path / "ckpt", 1, state, config_yaml=to_yaml(cfg), train_state={"step": 1}
    )
    for fmt in ("hf", "safetensors"):
        assert main([str(ckpt), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        assert capsys.readouterr().err == (
            f"error: cannot export {ckpt} as {fmt}: checkpoint {ckpt} holds a regression model "
            "(train.task=regression in its config.yaml): only language-model checkpoints (lm, sft) "
            "can be exported\n"
        )  # fmt: skip
        assert not (tmp_path / fmt).exists()


def test_a_manifest_with_a_bad_step_is_a_checkpoint_error(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "step": [12]}))
    assert main([str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot export {ckpt} as safetensors: checkpoint {ckpt}: manifest.json has "
        "step [12]: expected an int >= 0\n"
    )
    assert not (tmp_path / "w").exists()


def test_a_manifest_that_is_not_an_object_is_a_checkpoint_error(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    (ckpt / "manifest.json").write_text("[1]")
    for fmt in ("hf", "safetensors"):
        assert main([str(ckpt), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        assert capsys.readouterr().err == (
            f"error: cannot export {ckpt} as {fmt}: checkpoint {ckpt}: manifest.json is not an "
            "llmfn-checkpoint manifest: expected a JSON object, got a list\n"
        )
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("config_yaml", ["garbage: [", ""])
def test_an_overwritten_config_yaml_fails_verification_before_it_is_read(
    tmp_path, capsys, config_yaml
):
    ckpt = write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    size = (ckpt / "config.yaml").stat().st_size
    (ckpt / "config.yaml").write_text(config_yaml)
    for fmt in ("hf", "safetensors"):
        assert main([str(ckpt), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        assert capsys.readouterr().err == (
            f"error: cannot export {ckpt} as {fmt}: checkpoint {ckpt}: file config.yaml has "
            f"{len(config_yaml)} bytes, manifest.json says {size} (size check failed: truncated "
            "or overwritten)\n"
        )
        assert not (tmp_path / fmt).exists()


def test_a_damaged_latest_pointer_is_a_checkpoint_error_naming_it(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    pointer = tmp_path / "ckpt" / "latest"
    pointer.write_bytes(b"\xff\xfe")
    assert main([str(pointer), "--format", "safetensors", "--out", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot export {pointer} as safetensors: pointer file {pointer} holds text that "
        "is not UTF-8: expected the name of a step folder (e.g. step_000100)\n"
    )


def test_hf_export_of_an_moe_model_is_refused_before_writing(tmp_path, capsys):
    cfg = LLAMA.replace(use_moe=True, num_experts=4, top_k=2)
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, init_params(cfg))
    out = tmp_path / "hf"
    assert main([str(ckpt), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.use_moe=True cannot be expressed as HF llama" in err and str(ckpt) in err
    assert not out.exists()


@pytest.mark.slow
def test_command_line_entry_point(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "llmfn.export", *args], capture_output=True, text=True, timeout=300
    )
    done = run(str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "w"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "w" / "params.safetensors").is_file()
    failed = run(str(tmp_path / "nowhere"), "--format", "hf", "--out", str(tmp_path / "x"))
    assert failed.returncode == 2 and "does not exist" in failed.stderr


def test_a_failed_hf_export_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    import llmfn.export

    def tokenizer_copy_fails(tokenizer_dir, out_dir):  # after the weights and config are written
        assert (out_dir / "config.json").is_file()
        raise OSError(28, "No space left on device", str(out_dir / "tokenizer.json"))

    ckpt = write_checkpoint(tmp_path / "ckpt", LLAMA, init_params(LLAMA))
    monkeypatch.setattr(llmfn.export, "_copy_hf_tokenizer", tokenizer_copy_fails)
    out = tmp_path / "hf"
    assert main([str(ckpt), "--format", "hf", "--out", str(out)]) == 2
    assert "cannot be written: No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no out, no temporary


def test_a_trained_qkv_bias_window_model_exports_as_qwen2(tmp_path, capsys):
    """attention_bias="qkv" (Qwen2's layout: no output bias) with a sliding window: trained
    from the command-line config for a step, it exports as Qwen2 without --family and loads in
    transformers with the same logits (attention_bias=true would train a `bo` Qwen2 lacks)."""
    from llmfn.config import load_config
    from llmfn.trainer import train

    model = ["vocab_size=64", "hidden_size=32", "num_layers=2", "num_heads=4", "num_kv_heads=2"]
    model += ["max_seq_len=16", "sliding_window=4", "attention_bias=qkv"]
    overrides = [f"model.{item}" for item in model] + [
        "data.module=synthetic", "data.synthetic_vocab_size=64", "data.batch_size=2",
        "train.max_steps=2", "train.eval_every=2", "train.compile=false", "optim.lr=1e-2",
        "optim.warmup_steps=1", "logging.progress=false", "logging.plot=false",
        "checkpoint.save_best=false", f"train.run_dir={tmp_path}", "train.run_name=qwen",
    ]  # fmt: skip
    run_dir = train(load_config(None, overrides, {})).run_dir
    cfg, params, _ = load_for_inference(run_dir)
    assert cfg.attention_bias == "qkv" and "bo" not in params["layers", "0", "attn"]
    assert params["layers", "0", "attn", "bqkv"].count_nonzero() > 0  # trained

    out = tmp_path / "hf"
    assert main([str(run_dir), "--format", "hf", "--out", str(out)]) == 0, capsys.readouterr()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(hf_model).__name__ == "Qwen2ForCausalLM"
    assert hf_model.config.use_sliding_window and hf_model.config.sliding_window == 4
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = forward(params, tokens, cfg)
        full_attention = forward(params, tokens, cfg.replace(sliding_window=None))
        actual = hf_model.eval()(tokens).logits
    assert (full_attention - expected).abs().max().item() > 1e-3  # the window shows
    assert (actual - expected).abs().max().item() <= 1e-4
