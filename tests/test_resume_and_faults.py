"""Driver-level faults: SIGKILL then resume is bitwise identical, SIGTERM saves and exits
cleanly, non-finite steps halt with a diagnosis, a corrupted newest checkpoint falls back."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensordict import TensorDict

from llmfn import checkpoint as ckpt
from llmfn.config import load_config
from llmfn.stopping import SignalCheck, StopSignal, TrainingHalted
from llmfn.trainer import train
from tests.step_fixtures import TINY_SYNTHETIC_LM, run_torchrun

ROOT = Path(__file__).parent.parent
TINY = [
    *TINY_SYNTHETIC_LM,
    "model.dropout=0.1",
    "optim.warmup_steps=2",
    "train.compile=false",
    "train.eval_every=1000",
    "logging.log_every=1",
    "logging.progress=false",
    "logging.plot=false",
    "checkpoint.save_best=false",
]


def launch(run_dir: Path, name: str, *extra: str, processes: int = 1) -> subprocess.Popen:
    """`python -m llmfn.train` on TINY, or `torchrun --nproc_per_node N -m llmfn.train`."""
    args = [*TINY, f"train.run_dir={run_dir}", f"train.run_name={name}", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    runner = [sys.executable]
    if processes > 1:
        runner += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.Popen(
        [*runner, "-m", "llmfn.train", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def train_losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r.get("kind") == "train"}


def final_params(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "params.safetensors")


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    steps, half = 24, 12
    straight = launch(tmp_path, "straight", f"train.max_steps={steps}", "checkpoint.every=1000")
    interrupted = launch(tmp_path, "cut", f"train.max_steps={steps}", f"checkpoint.every={half}")
    checkpoint = tmp_path / "cut" / "checkpoints" / f"step_{half:06d}"
    wait_for(lambda: (checkpoint / "manifest.json").exists(), interrupted)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    code, _, err = finish(
        launch(
            tmp_path,
            "cut",
            f"train.max_steps={steps}",
            "checkpoint.every=1000",
            "train.resume=auto",
        )
    )
    assert code == 0, err[-2000:]
    assert finish(straight)[0] == 0

    expected, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "cut")
    assert sorted(resumed) == sorted(expected) == list(range(1, steps + 1))
    assert resumed == expected  # bitwise: identical floats at every step
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_at_the_step_boundary_and_exits_143(tmp_path):
    proc = launch(tmp_path, "term", "train.max_steps=100000", "checkpoint.every=1000")
    wait_for(lambda: (tmp_path / "term" / "metrics.jsonl").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-2000:]  # saved, but not finished: scripts can tell
    assert "received SIGTERM: saved a checkpoint at step" in out
    assert "training stopped at step" in out
    step = int(out.split("saved a checkpoint at step ")[1].split()[0])
    assert (tmp_path / "term" / "checkpoints" / f"step_{step:06d}" / "manifest.json").exists()
    code, out, err = finish(
        launch(tmp_path, "term", f"train.max_steps={step + 2}", "train.resume=auto")
    )
    assert code == 0, err[-2000:]
    assert f"at step {step}" in out and train_losses(tmp_path / "term").keys() >= {
        step + 1,
        step + 2,
    }


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_between_log_steps(tmp_path):
    """The ranks agree on a signal within seconds, not at log steps: torchrun kills its workers
    30 s after forwarding one, and log steps can be further apart than that."""
    proc = launch(
        tmp_path, "term", "train.max_steps=100000", "logging.log_every=100000", processes=2
    )
    wait_for(lambda: (tmp_path / "term" / "config.yaml").exists(), proc)
    time.sleep(5)  # well into the steps
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=60)
    assert "received SIGTERM: saved a checkpoint at step" in out, err[-2000:]
    step = int(out.split("saved a checkpoint at step ")[1].split()[0])
    assert (tmp_path / "term" / "checkpoints" / f"step_{step:06d}" / "manifest.json").exists()


def test_ranks_agree_on_signals_every_few_seconds_of_steps(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    check = SignalCheck(seconds=5.0, last_step=10, last_time=clock[0])
    clock[0] += 60.0  # the first step: compile
    assert not check.agree(11, False, torch.device("cpu"))
    assert check.next_step == 12
    clock[0] += 2.0  # 2 s a step: agree again 2 steps later
    assert not check.agree(12, False, torch.device("cpu"))
    assert check.next_step == 14
    clock[0] += 2 / 64  # fast steps: 320 steps apart
    assert check.agree(14, True, torch.device("cpu"))
    assert check.next_step == 14 + 320


def tiny_config(tmp_path, *extra):
    return load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.run_name=nan", *extra], {})


def test_nonfinite_halt_saves_a_diagnostic_checkpoint_and_names_tensors(tmp_path):
    config = tiny_config(
        tmp_path,
        "train.nonfinite=halt",
        "optim.lr=1e30",
        "optim.min_lr=0",
        "optim.warmup_steps=0",
        "optim.grad_clip=null",
        "train.max_steps=50",
    )
    with pytest.raises(
        TrainingHalted, match=r"non-finite loss or gradients from step (\d+) .*train.nonfinite=halt"
    ) as info:
        train(config)
    message = str(info.value)
    assert "grad:" in message or "layers." in message or "embed" in message
    diagnostic = next((tmp_path / "nan" / "checkpoints").glob("nonfinite_step_*"))
    params = load_file(diagnostic / "params.safetensors")
    assert all(torch.isfinite(t).all() for t in params.values())  # the last good values


def test_nonfinite_skip_halts_after_the_limit(tmp_path):
    config = tiny_config(
        tmp_path,
        "train.nonfinite=skip",
        "train.max_nonfinite=3",
        "optim.lr=1e30",
        "optim.min_lr=0",
        "optim.warmup_steps=0",
        "optim.grad_clip=null",
        "train.max_steps=50",
    )
    with pytest.raises(TrainingHalted, match=r"limit 3 in a row"):
        train(config)


def test_resume_auto_skips_a_corrupted_newest_checkpoint(tmp_path):
    result = train(
        tiny_config(tmp_path, "train.max_steps=6", "checkpoint.every=3", "train.run_name=c")
    )
    root = result.run_dir / "checkpoints"
    newest = root / "step_000006" / "params.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step_000006.*sha256"):
        resumed = train(
            tiny_config(tmp_path, "train.max_steps=8", "train.resume=auto", "train.run_name=c")
        )
    assert resumed.step == 8
    losses = train_losses(result.run_dir)
    assert {4, 5, 6, 7, 8} <= losses.keys()


def test_a_second_ctrl_c_interrupts_at_once():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"  # the first asks the loop to save and stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_fresh_run_never_overwrites_a_run_folder_with_checkpoints(tmp_path):
    first = train(tiny_config(tmp_path, "train.max_steps=2", "train.run_name=taken"))
    saved = first.run_dir / "checkpoints" / "step_000002" / "params.safetensors"
    before = saved.read_bytes()
    with pytest.raises(ValueError, match=r"taken already holds checkpoints .*train.resume=auto"):
        train(tiny_config(tmp_path, "train.max_steps=2", "train.run_name=taken", "train.seed=7"))
    saved.write_bytes(before[:-1] + bytes([before[-1] ^ 0xFF]))  # every checkpoint now corrupt
    with (
        pytest.warns(UserWarning, match="skipping checkpoint"),
        pytest.raises(ValueError, match=r"none of them passed verification"),
    ):
        train(
            tiny_config(tmp_path, "train.max_steps=2", "train.run_name=taken", "train.resume=auto")
        )
    assert saved.read_bytes()[:-1] == before[:-1]  # left for inspection


def test_resuming_from_a_copied_checkpoint_writes_a_new_run_folder(tmp_path):
    first = train(tiny_config(tmp_path / "runs", "train.max_steps=2", "train.run_name=a"))
    elsewhere = tmp_path / "kept" / "x" / "step_000002"
    shutil.copytree(first.run_dir / "checkpoints" / "step_000002", elsewhere)
    resumed = train(
        tiny_config(
            tmp_path / "runs", "train.max_steps=3", f"train.resume={elsewhere}", "train.run_name=b"
        )
    )
    assert resumed.step == 3 and resumed.run_dir == tmp_path / "runs" / "b"
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["x"]  # nothing written there


def test_a_runs_saved_config_resumes_that_run_not_the_newest(tmp_path):
    """The documented way to continue a run: its own config.yaml with train.resume=auto. Its
    run_name was null (a timestamp folder); the saved config names the folder it got."""
    first = load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.max_steps=2"], {})
    first = train(first)
    train(tiny_config(tmp_path, "train.max_steps=2", "train.run_name=newer"))
    saved = first.run_dir / "config.yaml"
    resumed = train(load_config(saved, ["train.resume=auto", "train.max_steps=3"], {}))
    assert resumed.run_dir == first.run_dir and resumed.step == 3
    assert 3 in train_losses(first.run_dir) and 3 not in train_losses(tmp_path / "newer")


def test_run_dir_that_is_a_file_fails_before_the_data_is_prepared(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"train.run_dir='.*afile' is a file: expected a folder"):
        train(tiny_config(tmp_path / "afile", "train.max_steps=1"))


@pytest.mark.slow
def test_checkpoint_saved_by_two_processes_resumes_in_one(tmp_path, capsys):
    run_torchrun(
        "-m", "llmfn.train", *TINY, f"train.run_dir={tmp_path}", "train.run_name=ddp",
        "train.max_steps=4", "checkpoint.every=1000",
    )  # fmt: skip
    state = json.loads(
        (tmp_path / "ddp" / "checkpoints" / "step_000004" / "train_state.json").read_text()
    )
    assert state["world_size"] == 2
    resumed = train(
        tiny_config(tmp_path, "train.run_name=ddp", "train.resume=auto", "train.max_steps=6")
    )
    assert resumed.step == 6
    assert {5, 6} <= train_losses(tmp_path / "ddp").keys()
    assert "a global batch of 8 rows (data.batch_size x train.grad_accum_steps x processes = " in (
        out := capsys.readouterr().out
    )
    assert "= 4 x 1 x 2) and this run has 4 (4 x 1 x 1)" in out


def test_an_interrupt_outside_the_loop_exits_130_in_one_line(monkeypatch, capsys):
    import llmfn.trainer

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(llmfn.trainer, "train", interrupted)
    monkeypatch.delenv("LLMFN_DEBUG", raising=False)
    assert llmfn.trainer.main_entry(load_config(None, [], {})) == 130
    assert capsys.readouterr().err == "interrupted (no checkpoint saved since the last one)\n"


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 1.82 PiB for an array"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 TB"),
    ],
)
def test_out_of_memory_exits_2_naming_the_sizes(monkeypatch, capsys, error):
    import llmfn.trainer

    def too_big(config):
        raise error

    monkeypatch.setattr(llmfn.trainer, "train", too_big)
    monkeypatch.delenv("LLMFN_DEBUG", raising=False)
    assert llmfn.trainer.main_entry(load_config(None, ["data.batch_size=3"], {})) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: out of memory ({str(error)[:30]}")
    assert "data.batch_size=3" in err and "Traceback" not in err


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_resuming_an_older_step_of_a_run_refuses_to_overwrite_its_newer_checkpoints(tmp_path):
    first = train(tiny_config(tmp_path, "train.max_steps=4", "checkpoint.every=2"))
    before = tree_bytes(first.run_dir)
    older = first.run_dir / "checkpoints" / "step_000002"
    with pytest.raises(ValueError, match=r"step 2 is older than .*\(step_000004\).*copy"):
        train(tiny_config(tmp_path, "train.max_steps=4", f"train.resume={older}"))
    assert tree_bytes(first.run_dir) == before
    copy = tmp_path / "branch" / "step_000002"
    shutil.copytree(older, copy)  # the way to branch off it: a new run folder
    branched = train(
        tiny_config(tmp_path, "train.max_steps=3", f"train.resume={copy}", "train.run_name=b")
    )
    assert branched.step == 3 and tree_bytes(first.run_dir) == before


def test_resuming_at_or_past_max_steps_trains_nothing_and_writes_nothing(tmp_path, capsys):
    first = train(tiny_config(tmp_path, "train.max_steps=2"))
    before = tree_bytes(first.run_dir)
    again = train(tiny_config(tmp_path, "train.max_steps=1", "train.resume=auto"))
    assert again.step == 2 and again.stopped_by == "max_steps" and again.run_dir == first.run_dir
    assert "nothing to train: " in capsys.readouterr().out
    assert tree_bytes(first.run_dir) == before


def test_a_fresh_run_refuses_a_folder_with_files_but_no_checkpoint(tmp_path):
    folder = tmp_path / "nan"  # tiny_config's run name
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(ValueError, match=r"run folder .*nan is not empty \(metrics.jsonl\)"):
        train(tiny_config(tmp_path, "train.max_steps=1"))
    assert (folder / "metrics.jsonl").read_text() == '{"mine": 1}\n'


def test_resuming_at_another_precision_starts_its_loss_scale_afresh(tmp_path, capsys):
    first = train(tiny_config(tmp_path, "train.max_steps=2"))  # fp32: loss scale 1
    resumed = train(
        tiny_config(tmp_path, "train.max_steps=3", "train.resume=auto", "train.precision=fp16")
    )
    assert "trained with train.precision=fp32, this run uses fp16" in capsys.readouterr().out
    scalars = load_file(first.run_dir / "checkpoints" / "step_000003" / "state.safetensors")
    assert resumed.step == 3 and float(scalars["loss_scale"]) == 2.0**16


def test_a_checkpoint_from_before_the_updates_count_resumes_as_if_never_cut(tmp_path):
    """Older checkpoints hold no `updates` (AdamW's count of applied updates): it resumes as the
    step, which it equals when nothing was skipped, so the run goes on as one never cut."""
    straight = train(tiny_config(tmp_path, "train.max_steps=3", "train.run_name=straight"))
    first = train(tiny_config(tmp_path, "train.max_steps=2", "train.run_name=first"))
    saved = first.run_dir / "checkpoints" / "step_000002"
    tensors = {**load_file(saved / "state.safetensors")}
    tensors.update({f"params.{k}": v for k, v in load_file(saved / "params.safetensors").items()})
    assert int(tensors.pop("updates")) == 2
    older = ckpt.save_checkpoint(
        tmp_path / "older",
        2,
        TensorDict(tensors, batch_size=[]).unflatten_keys("."),
        config_yaml=(saved / "config.yaml").read_text(),
        train_state=json.loads((saved / "train_state.json").read_text()),
    )
    assert "updates" not in load_file(older / "state.safetensors")
    resumed = train(
        tiny_config(tmp_path, "train.max_steps=3", f"train.resume={older}", "train.run_name=r")
    )
    assert train_losses(resumed.run_dir)[3] == train_losses(straight.run_dir)[3]
    a, b = final_params(straight.run_dir), final_params(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    scalars = load_file(resumed.run_dir / "checkpoints" / "step_000003" / "state.safetensors")
    assert int(scalars["updates"]) == int(scalars["step"]) == 3


def test_a_regular_checkpoint_never_holds_a_frozen_state(tmp_path):
    """halt freezes the state at the first non-finite step; the periodic save at step 5 (before
    the log step that checks) halts instead of writing a checkpoint a resume could not train
    from. The diagnosis names an overflowing gradient norm as such."""
    config = tiny_config(
        tmp_path,
        "train.task=regression",
        "data.module=regression",
        "optim.name=sgd",
        "optim.lr=1e6",
        "train.nonfinite=halt",
        "checkpoint.every=5",
        "logging.log_every=10",
        "train.max_steps=40",
    )
    with pytest.raises(TrainingHalted, match=r"from step (\d+) .*gradient norm overflow") as info:
        train(config)
    first = int(re.search(r"from step (\d+)", str(info.value))[1])
    folders = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert folders == [f"nonfinite_step_{first:06d}"]  # no step_000005, no `latest`


def run_two_ranks_with_a_fault(tmp_path: Path, mode: str, *extra: str) -> list[str]:
    """tests/ddp_resume_worker.py on TINY under 2 processes -> what each rank stopped with."""
    worker = str(ROOT / "tests" / "ddp_resume_worker.py")
    timeout = "distributed.timeout_s=30"  # a deadlock fails the test, not after 1800 s
    run_torchrun(worker, str(tmp_path), mode, *TINY, "train.device=cpu", timeout, *extra)
    return [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]


@pytest.mark.slow  # ~70 s on two busy cores
def test_ranks_that_cannot_all_read_the_checkpoint_stop_with_one_clear_error(tmp_path):
    train(tiny_config(tmp_path / "node0" / "runs", "train.max_steps=2", "train.run_name=r"))
    outcome = run_two_ranks_with_a_fault(
        tmp_path, "node_local", "train.run_dir=runs", "train.run_name=r",
        "train.resume=auto", "train.max_steps=3",
    )  # fmt: skip
    message = (
        "CheckpointNotShared: rank 1 cannot read runs/r/checkpoints/step_000002: checkpoints "
        "must be on a filesystem every rank sees"
    )
    assert all(text.startswith(message) for text in outcome), outcome


@pytest.mark.slow  # ~70 s on two busy cores
def test_a_save_failing_on_rank_0_names_the_folder_there_and_the_step_elsewhere(tmp_path):
    outcome = run_two_ranks_with_a_fault(
        tmp_path, "disk_full", f"train.run_dir={tmp_path}", "train.run_name=d", "train.max_steps=2"
    )
    folder = tmp_path / "d" / "checkpoints" / "step_000002"
    assert outcome == [
        f"CheckpointError: saving checkpoint {folder}: [Errno 28] No space left on device",
        "RankZeroFailed: rank 0 failed saving checkpoint step 2: its error is in rank 0's output",
    ]


def test_a_rank_that_cannot_read_the_checkpoint_stops_every_rank(tmp_path, monkeypatch):
    """The agreement of the two-process test above, with the all-reduce faked: rank 1 (this
    rank 0 can read it) reports it cannot."""
    from llmfn import resume

    first = train(tiny_config(tmp_path, "train.max_steps=1", "train.run_name=r"))
    step = first.run_dir / "checkpoints" / "step_000001"
    proc = resume.ProcessInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(resume, "max_over_ranks", lambda values, device: [max(values[0], 1.0)])
    with pytest.raises(resume.CheckpointNotShared, match=rf"rank 1 cannot read {step}: "):
        resume.check_every_rank_reads(step, proc)
    monkeypatch.setattr(resume, "max_over_ranks", lambda values, device: values)
    resume.check_every_rank_reads(step, proc)  # every rank reads it
    assert not resume.can_read_checkpoint(tmp_path / "elsewhere" / "step_000001")


def test_a_failed_save_names_the_checkpoint_folder_in_one_line(tmp_path, monkeypatch, capsys):
    from llmfn.trainer import main_entry

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", disk_full)
    assert main_entry(tiny_config(tmp_path, "train.max_steps=1", "train.run_name=f")) == 2
    folder = tmp_path / "f" / "checkpoints" / "step_000001"
    err = capsys.readouterr().err
    assert f"error: saving checkpoint {folder}: [Errno 28] No space left on device\n" in err


def test_resume_auto_without_a_run_name_never_continues_another_experiment(tmp_path):
    unnamed = [*TINY, f"train.run_dir={tmp_path}", "train.max_steps=2", "train.resume=auto"]
    mine = train(load_config(None, unnamed, {}))
    other_data = [*unnamed, "data.synthetic_size=256"]
    with pytest.warns(
        UserWarning, match=rf"not continuing {mine.run_dir.name} \(data.synthetic_size\)"
    ):
        other = train(load_config(None, other_data, {}))
    assert other.run_dir != mine.run_dir and other.step == 2
    assert not (mine.run_dir / "checkpoints" / "step_000003").exists()
    os.utime(mine.run_dir)  # mine is the newest again: still not the other's
    resumed = train(load_config(None, [*other_data, "train.max_steps=3"], {}))
    assert resumed.run_dir == other.run_dir and resumed.step == 3


def test_runs_started_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20250101-120000")
    unnamed = [*TINY, f"train.run_dir={tmp_path}", "train.max_steps=1"]
    runs = [train(load_config(None, unnamed, {})).run_dir.name for _ in range(3)]
    assert runs == ["20250101-120000", "20250101-120000-1", "20250101-120000-2"]


def test_a_run_name_taken_by_a_run_started_at_once_is_never_overwritten(tmp_path, monkeypatch):
    """The other run writes its config.yaml after this one checked the folder (was empty)."""
    from llmfn import trainer

    naming = trainer.naming_the_run_folder

    def other_run_takes_it(config, run_dir):
        (run_dir / "config.yaml").write_text("the other run's\n")
        return naming(config, run_dir)

    monkeypatch.setattr(trainer, "naming_the_run_folder", other_run_takes_it)
    (tmp_path / "same").mkdir()
    with pytest.raises(ValueError, match=r"same: another run started at the same time"):
        train(tiny_config(tmp_path, "train.max_steps=1", "train.run_name=same"))
    assert (tmp_path / "same" / "config.yaml").read_text() == "the other run's\n"


def test_resuming_keeps_the_runs_config_and_saves_the_resumed_one_beside_it(tmp_path):
    first = train(tiny_config(tmp_path, "train.max_steps=2", "train.run_name=k"))
    original = (first.run_dir / "config.yaml").read_text()
    train(tiny_config(tmp_path, "train.max_steps=3", "train.run_name=k", "train.resume=auto"))
    assert (first.run_dir / "config.yaml").read_text() == original
    resumed = (first.run_dir / "config-resume-2.yaml").read_text()
    assert "max_steps: 3" in resumed and "max_steps: 2" in original
