"""The driver end to end, in process: each task trains and its metrics move the right way."""

import json
import math
import os
import signal
import time
import warnings

import pytest
import torch

from llmfn import checkpoint as ckpt
from llmfn import model
from llmfn.callbacks import Callback
from llmfn.config import load_config
from llmfn.data.binarize import prepare_bins
from llmfn.resume import batch_change_warning, batch_layout
from llmfn.step import make_eval_step
from llmfn.tasks import get_task
from llmfn.trainer import slow_precision_warning, train
from tests.step_fixtures import TINY_SYNTHETIC_LM

TINY_MOE = [
    "model.vocab_size=64",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.max_seq_len=16",
    "model.use_moe=true",
    "model.num_experts=4",
    "model.top_k=2",
    "model.intermediate_size=32",
]
QUIET = [
    "logging.progress=false",
    "logging.plot=false",
    "train.compile=false",
    "checkpoint.save_best=false",
]


def config(tmp_path, *overrides):
    return load_config(
        None, [*QUIET, f"train.run_dir={tmp_path}", "train.run_name=run", *overrides], {}
    )


def evals(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "eval"]


def test_regression_trains_for_whole_epochs(tmp_path):
    cfg = config(
        tmp_path,
        "train.task=regression",
        "data.module=regression",
        "data.batch_size=32",
        "data.synthetic_size=640",
        "model.hidden_size=32",
        "model.num_layers=2",
        "train.epochs=3",
        "train.eval_every=5",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "optim.weight_decay=0",
    )
    result = train(cfg)
    per_epoch = (640 - 32) // 32  # 5% held out (at least one batch)
    assert result.step == 3 * per_epoch
    losses = [e["val_loss"] for e in evals(result.run_dir)]
    assert losses[-1] < 0.5 * losses[0]
    assert not any("val_ppl" in e for e in evals(result.run_dir))  # a squared error has none


def test_sft_trains_only_on_responses(tmp_path):
    path = tmp_path / "pairs.jsonl"
    records = [
        {"prompt": f"add {a} {b}:", "response": f" {a + b}"} for a in range(12) for b in range(12)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    cfg = config(
        tmp_path,
        "train.task=sft",
        "data.module=sft",
        f"data.path={path}",
        "data.tokenizer=char",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=8",
        "data.val_fraction=0.1",
        "data.val_batches=2",
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=4",
        "model.max_seq_len=32",
        "train.max_steps=30",
        "train.eval_every=10",
        "optim.lr=3e-3",
        "optim.warmup_steps=3",
    )
    result = train(cfg)
    losses = [e["val_loss"] for e in evals(result.run_dir)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all(
        e["val_ppl"] == pytest.approx(math.exp(e["val_loss"])) for e in evals(result.run_dir)
    )
    assert (result.run_dir / "tokenizer").is_dir() and (result.run_dir / "config.yaml").is_file()


def test_lm_with_moe_and_grad_accumulation_reports_router_losses(tmp_path):
    cfg = config(
        tmp_path,
        "data.module=synthetic",
        "data.synthetic_vocab_size=64",
        "data.batch_size=4",
        *TINY_MOE,
        "train.grad_accum_steps=2",
        "train.max_steps=6",
        "train.eval_every=3",
        "logging.log_every=1",
    )
    result = train(cfg)
    rows = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    assert len(train_rows) == 6
    assert all(
        r["moe_aux_loss"] >= 0.99 and r["router_z_loss"] > 0 for r in train_rows
    )  # balance loss >= 1
    assert train_rows[0]["tokens"] == 2 * 4 * 16


def test_validation_loss_of_a_moe_model_is_its_cross_entropy(tmp_path):
    """The router losses train the model but are not part of val_loss (nor val_ppl)."""
    cfg = config(
        tmp_path,
        *TINY_MOE,
        "model.moe_aux_loss_coef=0.5",
    )
    params = model.init_params(cfg.model, seed=0)
    tokens = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    task = get_task("lm")
    value = make_eval_step(task, cfg)(params, batch)["loss"]
    cross_entropy, _ = model.cross_entropy(
        model.forward(params, batch["inputs"], cfg.model), batch["targets"]
    )
    training_loss, _ = task.loss(params, batch, cfg)
    torch.testing.assert_close(value, cross_entropy)
    assert training_loss > cross_entropy + 0.4  # the weighted balance loss (>= 1) is in training


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_a_cpu_without_support_warns(monkeypatch, precision):
    support = f"_is_mkldnn_{precision}_supported"
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, support, lambda: False)
    warning = slow_precision_warning(precision, cpu)
    assert warning.startswith(f"warning: train.precision={precision} on a CPU without")
    assert slow_precision_warning("fp32", cpu) is None
    assert slow_precision_warning(precision, torch.device("cuda")) is None
    monkeypatch.setattr(torch.ops.mkldnn, support, lambda: True)
    assert slow_precision_warning(precision, cpu) is None


def test_full_float32_on_a_gpu_warns_unless_tf32_is_allowed():
    gpu = torch.device("cuda")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        warning = slow_precision_warning("fp32", gpu)
        assert warning.startswith("warning: train.precision=fp32 on a GPU runs float32 matmuls")
        assert "train.precision=bf16" in warning
        torch.set_float32_matmul_precision("high")
        assert slow_precision_warning("fp32", gpu) is None
    finally:
        torch.set_float32_matmul_precision(before)


def test_unknown_task_fails_before_the_data_is_prepared(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 200)
    cache = tmp_path / "cache"
    cfg = config(
        tmp_path, "train.task=lm_zloss", "data.module=text", f"data.path={text}",
        f"data.cache_dir={cache}", "data.tokenizer=char",
    )  # fmt: skip
    with pytest.raises(ValueError, match="train.task='lm_zloss' is unknown: expected one of lm"):
        train(cfg)
    assert not cache.exists() or not any(cache.iterdir())


def test_profile_at_traces_the_steps_after_it(tmp_path, capsys):
    cfg = config(
        tmp_path,
        "data.module=synthetic",
        "data.synthetic_vocab_size=64",
        "data.batch_size=2",
        "model.vocab_size=64",
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.num_heads=4",
        "model.max_seq_len=16",
        "model.intermediate_size=32",
        "train.max_steps=4",
        "train.sample_tokens=4",
        "logging.profile_at=1",
        "logging.profile_steps=2",
    )
    result = train(cfg)
    folder = result.run_dir / "profile"
    trace = json.loads((folder / "trace_steps_2-3.json").read_text())
    assert {"train step 2", "train step 3"} <= {event.get("name") for event in trace["traceEvents"]}
    assert "aten::" in (folder / "top_ops_steps_2-3.txt").read_text()
    assert "profiler: steps 2-3 recorded" in capsys.readouterr().out


def test_resuming_with_another_global_batch_warns_and_another_split_does_not():
    config = load_config(None, ["data.batch_size=4", "train.grad_accum_steps=2"])
    saved = batch_layout(config, world_size=2)  # 16 rows a step
    assert batch_change_warning(saved, config, world_size=2) is None
    split = load_config(None, ["data.batch_size=8", "train.grad_accum_steps=1"])
    assert batch_change_warning(saved, split, world_size=2) is None  # 8 x 1 x 2: the same rows
    warning = batch_change_warning(saved, split, world_size=1)
    assert warning.startswith(
        "warning: the checkpoint trained with a global batch of 16 rows (data.batch_size x "
        "train.grad_accum_steps x processes = 4 x 2 x 2) and this run has 8 (8 x 1 x 1)"
    )
    older = {"world_size": 2}  # a checkpoint from before the layout was saved
    assert batch_change_warning(older, config, world_size=2) is None
    assert (
        "16 rows (data.batch_size x train.grad_accum_steps x processes = 4 x 2 x 2) and this run has 8"
        in (batch_change_warning(older, config, world_size=1))
    )


# lr 1e-30: the val loss never improves, so early stopping's patience (2) runs out
NEVER_IMPROVES = [
    "train.task=regression",
    "data.module=regression",
    "data.batch_size=8",
    "model.hidden_size=16",
    "model.num_layers=1",
    "optim.name=sgd",
    "optim.lr=1e-30",
    "optim.min_lr=0",
    "optim.warmup_steps=0",
    "train.eval_every=2",
    "train.early_stopping_patience=2",
]


def test_early_stopping_evaluates_once_and_a_resume_has_nothing_to_train(tmp_path, capsys):
    """lr 1e-30: the val loss never improves, so patience 2 stops at the third eval (step 6). That
    step is evaluated once; resuming the stopped run trains nothing and writes nothing, unless
    the patience allows more."""
    frozen = [*NEVER_IMPROVES, "train.max_steps=40"]
    result = train(config(tmp_path, *frozen))
    assert (result.step, result.stopped_by) == (6, "early_stopping")
    assert [row["step"] for row in evals(result.run_dir)] == [2, 4, 6]
    metrics = (result.run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()

    again = train(config(tmp_path, *frozen, "train.resume=auto"))
    assert (again.step, again.stopped_by) == (6, "early_stopping")
    assert "nothing to train" in capsys.readouterr().out
    assert (result.run_dir / "metrics.jsonl").read_text() == metrics  # nothing written

    more = train(config(tmp_path, *frozen, "train.resume=auto", "train.early_stopping_patience=3"))
    assert (more.step, more.stopped_by) == (8, "early_stopping")


def test_keep_last_n_keeps_only_the_latest_and_the_best(tmp_path):
    result = train(
        config(
            tmp_path,
            "train.task=regression",
            "data.module=regression",
            "data.batch_size=8",
            "model.hidden_size=16",
            "model.num_layers=1",
            "optim.warmup_steps=0",
            "train.eval_every=2",
            "train.max_steps=8",
            "checkpoint.save_best=true",
            "checkpoint.every=2",
            "checkpoint.keep_last_n=1",
        )
    )
    root = result.run_dir / "checkpoints"
    named = {(root / (root / pointer).read_text().strip()) for pointer in ("latest", "best")}
    assert set(root.glob("step_*")) == named


def test_early_stopping_does_not_stop_a_run_that_reached_max_steps(tmp_path, capsys):
    """Patience 2 runs out at the final eval (step 6 = max_steps): the run ended anyway, so no
    early stop is recorded and a resume with a larger max_steps trains on (and stops early at
    its first eval, the val loss still not improving)."""
    frozen = NEVER_IMPROVES
    result = train(config(tmp_path, *frozen, "train.max_steps=6"))
    assert (result.step, result.stopped_by) == (6, "max_steps")
    assert [row["step"] for row in evals(result.run_dir)] == [2, 4, 6]
    assert "early stopping" not in capsys.readouterr().out
    more = train(config(tmp_path, *frozen, "train.max_steps=20", "train.resume=auto"))
    assert (more.step, more.stopped_by) == (8, "early_stopping")


def char_lm(text) -> list[str]:
    """A tiny language model on the text file `text` with a char tokenizer."""
    return [
        "data.module=text",
        f"data.path={text}",
        "data.tokenizer=char",
        "model.vocab_size=64",
        "model.hidden_size=16",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.max_seq_len=16",
        "data.batch_size=2",
    ]


def test_resuming_after_the_data_got_another_tokenizer_fails_naming_both(tmp_path):
    """A char tokenizer ranks the corpus's characters: one more line of a new character
    prepares the data again with other ids. Resuming then stops before loading anything."""
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 200)
    lm = [*char_lm(text), f"data.cache_dir={tmp_path / 'cache'}"]
    first = train(config(tmp_path, *lm, "train.max_steps=2"))
    same = train(config(tmp_path, *lm, "train.max_steps=3", "train.resume=auto"))
    assert same.step == 3  # the same data resumes
    text.write_text("hello world\n" * 200 + "z" * 5000 + "\n")
    saved = first.run_dir / "checkpoints" / "step_000003" / "tokenizer"
    with pytest.raises(ValueError) as error:
        train(config(tmp_path, *lm, "train.max_steps=4", "train.resume=auto"))
    assert f"trained with the tokenizer in {saved}, but the data of data.path='{text}'" in str(
        error.value
    )
    assert "data.tokenizer='char') now has another one" in str(error.value)


def test_resuming_a_text_run_on_data_without_a_tokenizer_fails(tmp_path):
    """Synthetic tokens after a text run: the data changed, and the run's next checkpoints would
    have no tokenizer to generate with."""
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 200)
    lm = [*char_lm(text), f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2"]
    first = train(config(tmp_path, *lm))
    synthetic = ["data.module=synthetic", "data.synthetic_vocab_size=64", "train.max_steps=3"]
    with pytest.raises(ValueError) as error:
        train(config(tmp_path, *lm, *synthetic, "train.resume=auto"))
    saved = first.run_dir / "checkpoints" / "step_000002"
    assert (
        f"checkpoint {saved} trained on text with the tokenizer in {saved / 'tokenizer'}, "
        "but data.module='synthetic' has no tokenizer" in str(error.value)
    )
    assert sorted(p.name for p in (first.run_dir / "checkpoints").glob("step_*")) == ["step_000002"]


def test_the_largest_seed_trains(tmp_path):
    """train.seed's documented bound, 2**63 - 1, fits every seed it feeds: the params' and the
    data's generators and the state's int64 dropout key."""
    result = train(
        config(
            tmp_path,
            "train.task=regression",
            "data.module=regression",
            "model.hidden_size=16",
            "model.num_layers=1",
            f"train.seed={2**63 - 1}",
            "train.max_steps=1",
        )
    )
    assert result.step == 1


TINY_LM = [*TINY_SYNTHETIC_LM, "train.eval_every=1000"]


def train_steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("kind") == "train"]


@pytest.mark.parametrize(
    ("overrides", "logged", "stopped_by"),
    [
        (["train.max_steps=3", "logging.log_every=10"], [3], "max_steps"),
        ([*NEVER_IMPROVES, "train.max_steps=40", "logging.log_every=4"], [4, 6], "early_stopping"),
    ],
)
def test_the_step_a_run_ends_at_is_logged_once(tmp_path, overrides, logged, stopped_by):
    result = train(config(tmp_path, *TINY_LM, *overrides))
    assert result.stopped_by == stopped_by
    assert train_steps(result.run_dir) == logged


def test_a_missing_tensorboard_fails_before_the_data_and_the_run_folder(tmp_path, monkeypatch):
    import sys

    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=r"logging.tensorboard=true needs .*pip install"):
        train(
            config(
                tmp_path / "runs",
                *TINY_LM,
                "logging.tensorboard=true",
                "data.cache_dir=" + str(tmp_path / "cache"),
            )
        )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


class Ends(Callback):
    """Records its on_train_end and on_exception; `start_error` fails its on_train_start."""

    def __init__(self, start_error=None):
        self.start_error, self.calls = start_error, []

    def on_train_start(self, run):
        if self.start_error:
            raise self.start_error

    def on_train_end(self, run, step):
        self.calls.append("end")

    def on_exception(self, run, step, error):
        self.calls.append("exception")


class CtrlCDuringTheEnd(Callback):
    """Ctrl-C while its on_train_end works (as during the final sample)."""

    def on_train_end(self, run, step):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # interrupted at once, or the test takes 30 s and fails


def test_ctrl_c_during_the_end_of_run_callbacks_is_a_clean_stop_that_ends_the_rest(tmp_path):
    later = Ends()
    result = train(
        config(tmp_path, *TINY_LM, "train.max_steps=2"), callbacks=[CtrlCDuringTheEnd(), later]
    )
    assert (result.step, result.stopped_by) == (2, "SIGINT")
    assert later.calls == ["end"]
    assert (result.run_dir / "checkpoints" / "step_000002").is_dir()


def test_a_failing_on_train_start_still_reaches_on_exception(tmp_path):
    earlier = Ends()
    with pytest.raises(OSError, match="disk gone"):
        train(
            config(tmp_path, *TINY_LM, "train.max_steps=2"),
            callbacks=[earlier, Ends(OSError("disk gone"))],
        )
    assert earlier.calls == ["exception"]


def test_tokens_seen_counts_exactly_past_float32s_range(tmp_path, monkeypatch):
    """2**24 + 1 tokens is no float32: counted in one, resuming there loses a token."""
    first = train(config(tmp_path, *TINY_LM, "train.max_steps=1"))
    load = ckpt.load_checkpoint

    def load_with_many_tokens(*args, **kwargs):
        state, train_state = load(*args, **kwargs)
        return state, {**train_state, "tokens_seen": 2**24 + 1}

    monkeypatch.setattr(ckpt, "load_checkpoint", load_with_many_tokens)
    train(
        config(
            tmp_path,
            *TINY_LM,
            "train.max_steps=2",
            "train.resume=auto",
        )
    )
    saved = json.loads(
        (first.run_dir / "checkpoints" / "step_000002" / "train_state.json").read_text()
    )
    per_step = 4 * 16  # rows x max_seq_len, every target counted
    assert saved["tokens_seen"] == 2**24 + 1 + per_step
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens_seen"] == 2**24 + 1 + per_step


def test_a_run_starts_from_another_runs_weights_with_a_fresh_step(tmp_path, capsys):
    """checkpoint.init_from: the params of the first run's last checkpoint, a fresh optimizer and
    step (an lr of 1e-12 keeps them as loaded); dropout may change; another tokenizer is
    refused."""
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 200)
    lm = char_lm(text)
    first = train(config(tmp_path, *lm, f"data.cache_dir={tmp_path / 'a'}", "train.max_steps=3"))
    _, trained, _ = ckpt.load_for_inference(first.run_dir)
    start = [f"checkpoint.init_from={first.run_dir}", "train.run_name=second", "model.dropout=0.1"]
    still = ["optim.lr=1e-12", "optim.min_lr=0", "train.max_steps=1"]
    second = train(config(tmp_path, *lm, f"data.cache_dir={tmp_path / 'a'}", *start, *still))
    assert second.step == 1 and second.run_dir.name == "second"
    assert f"initial params from {first.run_dir / 'checkpoints' / 'step_000003'}" in (
        capsys.readouterr().out
    )
    _, started, _ = ckpt.load_for_inference(second.run_dir)
    for key, value in trained.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(started[key], value, rtol=0, atol=1e-9, msg=key)
    text.write_text("hello world\n" * 200 + "z" * 5000 + "\n")  # a char tokenizer ranks again
    with pytest.raises(ValueError, match="checkpoint.init_from: .* has another one"):
        train(config(tmp_path, *lm, f"data.cache_dir={tmp_path / 'b'}", *start, *still))


def no_val_split_bins(tmp_path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    prepare_bins(corpus, tmp_path / "bins", tokenizer="char", val_fraction=0, progress=False)
    return ["data.module=token_bin", f"data.path={tmp_path / 'bins'}", "data.val_fraction=0"]


@pytest.mark.parametrize("module", ["synthetic", "token_bin"])
def test_a_run_without_validation_data_says_so_once(tmp_path, capsys, module):
    """Nothing to evaluate: one note naming the reason, and no eval rows nor best/ checkpoint."""
    data, why = {
        "synthetic": (["data.val_fraction=0"], "data.val_fraction=0"),
        "token_bin": (no_val_split_bins(tmp_path), "data.module=token_bin yields none"),
    }[module]
    cfg = config(
        tmp_path,
        *TINY_SYNTHETIC_LM,
        *data,
        "train.max_steps=4",
        "train.eval_every=1",
        "checkpoint.save_best=true",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg)
    if module == "token_bin":  # the data module says why first
        assert any("val.bin holds 0 tokens" in str(w.message) for w in caught)
    out = capsys.readouterr().out
    assert out.count("note: no validation batches") == 1
    assert why in out and "checkpoint.save_best keeps no best/" in out
    assert evals(result.run_dir) == []
    assert not (result.run_dir / "checkpoints" / "best").exists()


@pytest.mark.parametrize("key", ["train.resume", "checkpoint.init_from"])
def test_a_missing_checkpoint_path_names_the_key_that_gave_it(tmp_path, key):
    missing = tmp_path / "nope"
    with pytest.raises(
        ckpt.CheckpointError, match=rf"^{key}={missing}: .*{missing} does not exist"
    ):
        train(config(tmp_path, *TINY_SYNTHETIC_LM, f"{key}={missing}", "train.max_steps=1"))
