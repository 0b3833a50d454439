"""Callbacks fed synthetic metric tensors in a temporary run folder: files, output and state."""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfn.callbacks import (
    Callback,
    CallbackList,
    ConsoleLogger,
    EarlyStopping,
    JsonlLogger,
    LossCurvePlot,
    LRMonitor,
    Profiler,
    ProgressBar,
    RunInfo,
    SampleText,
    TensorBoardLogger,
    Throughput,
    default_callbacks,
    model_flops_utilization,
    read_jsonl,
    to_floats,
)
from llmfn.callbacks.lr_monitor import describe_schedule
from llmfn.config import Config, ConfigError, from_dict
from llmfn.schedule import lr_schedule_from_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- helpers ----------------------------------------------------------------------------------
def make_run(run_dir: Path, **changes) -> RunInfo:
    fields = dict(
        config=Config(),
        run_dir=Path(run_dir),
        is_main=True,
        max_steps=40,
        start_step=0,
        tokens_per_step=1000,
        flops_per_token=6000,
        peak_flops=None,
        world_size=1,
        sample_fn=None,
    )
    fields.update(changes)
    return RunInfo(**fields)


def step_metrics(step: int) -> dict[str, torch.Tensor]:
    """What a compiled step returns: 0-d tensors (loss falls with step, lr = step * 1e-5)."""
    return {
        "loss": torch.tensor(5.0 - 0.05 * step),
        "grad_norm": torch.tensor(0.25 + step / 1000),
        "lr": torch.tensor(step * 1e-5),
        "tokens": torch.tensor(1000 * step, dtype=torch.long),
        "nonfinite": torch.tensor(0.0),
    }


def drive(callbacks: Callback, run: RunInfo, evals: dict[int, float] | None = None) -> None:
    """The driver loop: steps start_step+1..max_steps, evals at the given steps, then the end."""
    evals = evals or {}
    callbacks = callbacks if isinstance(callbacks, CallbackList) else CallbackList([callbacks])
    callbacks.on_train_start(run)
    for step in range(run.start_step + 1, run.max_steps + 1):
        callbacks.on_step_end(run, step, step_metrics(step))
        if step in evals:
            val = evals[step]
            callbacks.on_eval(run, step, {"val_loss": val, "val_ppl": math.exp(val)})
        if run.stop_requested:
            break
    callbacks.on_train_end(run, step)


class FakeClock:
    """A clock that advances `seconds_per_call` every time it is read."""

    def __init__(self, seconds_per_call: float):
        self.now = 0.0
        self.seconds_per_call = seconds_per_call

    def __call__(self) -> float:
        self.now += self.seconds_per_call
        return self.now


class Recorder(Callback):
    def __init__(self, every: int = 1):
        self.every = every
        self.calls: list[tuple] = []

    def on_train_start(self, run):
        self.calls.append(("start",))

    def on_step_end(self, run, step, metrics):
        self.calls.append(("step", step))

    def on_eval(self, run, step, metrics):
        self.calls.append(("eval", step))

    def on_checkpoint(self, run, step, path):
        self.calls.append(("checkpoint", step))

    def on_train_end(self, run, step):
        self.calls.append(("end", step))

    def on_exception(self, run, step, error):
        self.calls.append(("exception", step))


# --- base: CallbackList ------------------------------------------------------------------------
def test_callback_list_respects_every_and_dispatches_other_hooks_always(tmp_path):
    every_3, every_1 = Recorder(every=3), Recorder()
    callbacks = CallbackList([every_3, every_1])
    run = make_run(tmp_path, max_steps=10)
    drive(callbacks, run, evals={5: 1.0})
    callbacks.on_checkpoint(run, 10, tmp_path)
    assert [c[1] for c in every_3.calls if c[0] == "step"] == [3, 6, 9]
    assert [c[1] for c in every_1.calls if c[0] == "step"] == list(range(1, 11))
    for recorder in (every_3, every_1):
        assert recorder.calls[0] == ("start",)
        assert ("eval", 5) in recorder.calls and ("end", 10) in recorder.calls
        assert recorder.calls[-1] == ("checkpoint", 10)


@pytest.mark.parametrize("every", [0, -2, 1.5, True])
def test_callback_list_rejects_a_bad_every(every):
    with pytest.raises(ValueError, match=r"Recorder\.every=.*positive int"):
        CallbackList([Recorder(every=every)])


def test_callback_list_rejects_non_callbacks():
    with pytest.raises(TypeError, match="Callback instances"):
        CallbackList([object()])


def test_callback_list_state_names_repeats_and_round_trips_through_json(tmp_path):
    first, second = EarlyStopping(patience=2), EarlyStopping(patience=5)
    callbacks = CallbackList([first, second, Recorder()])
    run = make_run(tmp_path)
    callbacks.on_eval(run, 10, {"val_loss": 2.0})
    callbacks.on_eval(run, 20, {"val_loss": 2.5})
    state = json.loads(json.dumps(callbacks.state_dict()))
    assert set(state) == {"EarlyStopping", "EarlyStopping_1", "Recorder"}
    assert state["EarlyStopping"] == {
        "best": 2.0,
        "best_step": 10,
        "bad_evals": 1,
        "stopped_step": None,
    }

    fresh = CallbackList([EarlyStopping(patience=2), EarlyStopping(patience=5), Recorder()])
    fresh.load_state_dict({**state, "RemovedCallback": {"x": 1}})  # unknown names are ignored
    assert fresh.state_dict() == state
    with pytest.raises(TypeError, match="dict of"):
        fresh.load_state_dict([1, 2])


def test_on_exception_reaches_every_callback_even_if_one_fails(tmp_path, capsys):
    class Broken(Callback):
        def on_exception(self, run, step, error):
            raise RuntimeError("broken handler")

    recorder = Recorder()
    CallbackList([Broken(), recorder]).on_exception(make_run(tmp_path), 7, KeyboardInterrupt())
    assert recorder.calls == [("exception", 7)]
    assert "Broken.on_exception failed" in capsys.readouterr().err


def test_on_train_end_ends_every_callback_then_raises_the_first_failure(tmp_path, capsys):
    class Broken(Callback):
        def on_train_end(self, run, step):
            raise RuntimeError("broken end")

    class Interrupted(Callback):
        def on_train_end(self, run, step):
            raise KeyboardInterrupt

    recorder = Recorder()
    callbacks = CallbackList([Broken(), Interrupted(), recorder])
    with pytest.raises(RuntimeError, match="broken end"):
        callbacks.on_train_end(make_run(tmp_path), 7)
    assert recorder.calls == [("end", 7)]
    err = capsys.readouterr().err
    assert "Broken.on_train_end failed: RuntimeError('broken end')" in err
    assert "Interrupted.on_train_end interrupted" in err


def test_the_last_step_reaches_only_the_callbacks_every_skipped(tmp_path):
    every_1, every_4, every_5 = Recorder(1), Recorder(4), Recorder(5)
    callbacks = CallbackList([every_1, every_4, every_5])
    run = make_run(tmp_path)
    for step in (4, 5):
        callbacks.on_step_end(run, step, step_metrics(step))
    callbacks.on_last_step_end(run, 5, step_metrics(5))
    assert every_1.calls == [("step", 4), ("step", 5)]  # never twice
    assert every_4.calls == [("step", 4), ("step", 5)]
    assert every_5.calls == [("step", 5)]


# --- scalars and throughput --------------------------------------------------------------------
def test_to_floats_keeps_one_element_values_only():
    metrics = {
        "loss": torch.tensor(2.5),
        "one": torch.tensor([3]),
        "per_expert": torch.ones(4),
        "lr": 1e-3,
        "flag": True,
        "name": "x",
    }
    assert to_floats(metrics) == {"loss": 2.5, "one": 3.0, "lr": 1e-3}


def test_throughput_measures_the_steps_between_calls(tmp_path):
    run = make_run(
        tmp_path, tokens_per_step=2048, flops_per_token=1e6, peak_flops=1e12, world_size=2
    )
    meter = Throughput(clock=FakeClock(0.5))
    meter.restart(0)  # t = 0.5
    rates = meter.measure(run, 10)  # t = 1.0: 10 steps in 0.5 s
    assert rates["step_time_s"] == pytest.approx(0.05)
    assert rates["tok_per_s"] == pytest.approx(10 * 2048 / 0.5)
    assert rates["mfu"] == pytest.approx(1e6 * 40960 / (1e12 * 2))
    assert meter.measure(run, 10) == {}  # no new steps: nothing to report
    assert model_flops_utilization(make_run(tmp_path, peak_flops=None), 1e5) is None
    no_tokens = make_run(tmp_path, tokens_per_step=0, peak_flops=1e12)
    meter.restart(0)
    assert set(meter.measure(no_tokens, 4)) == {"step_time_s"}


# --- ConsoleLogger -------------------------------------------------------------------------------
def test_console_logger_prints_every_n_steps_and_evals(tmp_path, capsys):
    logger = ConsoleLogger(every=10)
    logger.throughput.clock = FakeClock(1.0)  # 10 steps per second of fake time
    drive(CallbackList([logger]), make_run(tmp_path, peak_flops=None), evals={20: 3.25})
    lines = capsys.readouterr().out.splitlines()
    step_lines = [line for line in lines if line.startswith("step")]
    assert [line.split()[1] for line in step_lines] == ["10/40", "20/40", "30/40", "40/40"]
    assert step_lines[0] == "step 10/40 | loss 4.5000 | grad_norm 0.26 | lr 1.00e-04 | 10,000 tok/s"
    assert [line for line in lines if line.startswith("eval")] == [
        "eval 20/40 | val_loss 3.2500 | val_ppl 25.79"
    ]
    assert "MFU" not in "".join(lines)  # no peak_flops (CPU): no MFU
    assert (
        lines[0].startswith("training to step 40") and lines[-1] == "training finished at step 40"
    )


def test_console_logger_shows_mfu_when_peak_is_known(tmp_path, capsys):
    logger = ConsoleLogger(every=10)
    logger.throughput.clock = FakeClock(1.0)
    drive(logger, make_run(tmp_path, peak_flops=1e8, max_steps=10))
    # 10 steps in 1 s = 10,000 tok/s; 6000 flop/token -> 6e7 / 1e8 = 60%.
    assert "| 10,000 tok/s | MFU 60.0%" in capsys.readouterr().out


def test_on_a_gpu_the_logs_show_the_runs_peak_memory(tmp_path, capsys, monkeypatch):
    asked = []

    def max_memory_allocated(device):
        asked.append(device)
        return 14.25 * 2**30

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    gpu = torch.device("cuda:0")
    logger, jsonl = ConsoleLogger(every=10), JsonlLogger(every=10)
    logger.throughput.clock, jsonl.throughput.clock = FakeClock(1.0), FakeClock(1.0)
    drive(CallbackList([logger, jsonl]), make_run(tmp_path, max_steps=10, device=gpu))
    assert "| 10,000 tok/s | mem 14.2 GiB" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["peak_mem_gib"] == 14.25
    assert set(asked) == {gpu}
    drive(ConsoleLogger(every=10), make_run(tmp_path, max_steps=10, device=torch.device("cpu")))
    assert "mem" not in capsys.readouterr().out  # CPU: no CUDA memory to report


def test_console_logger_excludes_eval_time_from_throughput(tmp_path, capsys):
    logger = ConsoleLogger(every=10)
    clock = FakeClock(1.0)
    logger.throughput.clock = clock
    run = make_run(tmp_path, max_steps=20)
    logger.on_train_start(run)  # t=1
    logger.on_step_end(run, 10, step_metrics(10))  # t=2
    clock.now += 100.0  # a slow eval
    logger.on_eval(run, 10, {"val_loss": 1.0})  # restart at t=103
    logger.on_step_end(run, 20, step_metrics(20))  # t=104: 10 steps in 1 s
    assert capsys.readouterr().out.splitlines()[-1].endswith("| 10,000 tok/s")


def test_console_logger_prints_nothing_off_rank_zero(tmp_path, capsys):
    logger = ConsoleLogger(every=1)
    run = make_run(tmp_path, is_main=False)
    drive(logger, run, evals={5: 1.0})
    logger.on_checkpoint(run, 5, tmp_path)
    logger.on_exception(run, 6, RuntimeError("x"))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --- ProgressBar -------------------------------------------------------------------------------
def test_progress_bar_shows_loss_tok_s_and_mfu_and_finishes(tmp_path):
    out = io.StringIO()
    bar = ProgressBar(log_every=5, console=out)
    bar.throughput.clock = FakeClock(1.0)
    run = make_run(tmp_path, max_steps=20, peak_flops=1e8)
    bar.on_train_start(run)
    for step in range(1, 21):
        bar.on_step_end(run, step, step_metrics(step))
        if step == 12:
            assert bar.bar.n == 12  # advances every step, not only on logged ones
    bar.on_eval(run, 20, {"val_loss": 3.5})
    assert bar.bar.postfix == "loss=4.0000, val_loss=3.5000, tok/s=5,000, MFU=30.0%"
    bar.on_train_end(run, 20)
    assert bar.bar is None
    text = out.getvalue()
    assert "20/20" in text and "loss=4.0000" in text


def test_progress_bar_starts_at_start_step_on_resume_and_has_no_mfu_on_cpu(tmp_path):
    out = io.StringIO()
    bar = ProgressBar(log_every=5, console=out)
    run = make_run(tmp_path, max_steps=40, start_step=30, peak_flops=None)
    bar.on_train_start(run)
    assert bar.bar.n == 30 and bar.bar.total == 40
    for step in range(31, 41):
        bar.on_step_end(run, step, step_metrics(step))
    assert "MFU" not in str(bar.bar.postfix) and "tok/s" in str(bar.bar.postfix)
    bar.on_train_end(run, 40)
    assert "40/40" in out.getvalue()


def test_progress_bar_prints_nothing_off_rank_zero(tmp_path, capsys):
    bar = ProgressBar(log_every=2)
    run = make_run(tmp_path, is_main=False)
    drive(bar, run, evals={4: 1.0})
    bar.on_exception(run, 5, RuntimeError("x"))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_draws_nothing_when_stderr_is_not_a_terminal(tmp_path, capsys):
    bar = ProgressBar(log_every=2)  # pytest captures stderr: not a terminal
    run = make_run(tmp_path)
    drive(bar, run, evals={4: 1.0})
    assert bar.bar is None
    assert capsys.readouterr().err == ""


def test_progress_bar_rejects_bad_log_every():
    with pytest.raises(ValueError, match="log_every"):
        ProgressBar(log_every=0)


# --- JsonlLogger -------------------------------------------------------------------------------
def test_jsonl_logger_writes_one_record_per_logged_step_and_eval(tmp_path):
    logger = JsonlLogger(every=10)
    drive(CallbackList([logger]), make_run(tmp_path), evals={20: 3.0, 40: 2.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert [r["step"] for r in evals] == [20, 40]
    for record in train:
        expected = {k: float(v) for k, v in step_metrics(record["step"]).items()}
        assert {k: record[k] for k in expected} == expected
        assert record["tok_per_s"] > 0 and "mfu" not in record
        assert all(isinstance(record[k], float) for k in expected)
    assert evals[1]["val_loss"] == 2.5 and evals[1]["val_ppl"] == pytest.approx(math.exp(2.5))


def test_jsonl_logger_writes_non_finite_values_as_null(tmp_path):
    logger = JsonlLogger(every=1)
    run = make_run(tmp_path)
    logger.on_train_start(run)
    logger.on_step_end(
        run, 1, {"loss": torch.tensor(float("nan")), "grad_norm": torch.tensor(float("inf"))}
    )
    logger.on_train_end(run, 1)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert record["loss"] is None and record["grad_norm"] is None


def test_jsonl_logger_drops_records_of_the_interrupted_run_on_resume(tmp_path):
    first = JsonlLogger(every=10)
    drive(first, make_run(tmp_path, max_steps=40), evals={20: 3.0, 40: 2.9})
    resumed = JsonlLogger(every=10)
    drive(resumed, make_run(tmp_path, max_steps=50, start_step=20), evals={40: 2.8})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 10),
        ("train", 20),
        ("eval", 20),
        ("train", 30),
        ("train", 40),
        ("eval", 40),
        ("train", 50),
    ]
    assert records[5]["val_loss"] == 2.8


def test_jsonl_rows_hold_the_exact_tokens_seen_and_the_time_and_elapsed_goes_on(tmp_path):
    seen = torch.tensor(2**53 + 1, dtype=torch.int64)  # not a float64
    before = time.time()
    drive(JsonlLogger(every=10), make_run(tmp_path, max_steps=20, tokens_seen=seen), {20: 3.0})
    first = read_jsonl(tmp_path / "metrics.jsonl")
    assert {r["tokens_seen"] for r in first} == {2**53 + 1}
    assert all(before <= r["time"] <= time.time() for r in first)
    lines = [json.dumps({**r, "elapsed_s": 1000.0}) + "\n" for r in first]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))  # as if the run trained 1000 s
    drive(JsonlLogger(every=10), make_run(tmp_path, max_steps=30, start_step=20))
    resumed = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert resumed["step"] == 30 and 1000 < resumed["elapsed_s"] < 1100


def test_jsonl_logger_writes_nothing_off_rank_zero(tmp_path):
    drive(JsonlLogger(every=1), make_run(tmp_path, is_main=False), evals={3: 1.0})
    assert list(tmp_path.iterdir()) == []


def test_jsonl_logger_excludes_checkpoint_time_from_throughput(tmp_path):
    logger = JsonlLogger(every=10)
    clock = FakeClock(1.0)
    logger.throughput.clock = clock
    run = make_run(tmp_path, max_steps=20)
    logger.on_train_start(run)  # t=1
    logger.on_step_end(run, 10, step_metrics(10))  # t=2
    clock.now += 100.0  # a slow save
    logger.on_checkpoint(run, 10, tmp_path)  # restart at t=103
    logger.on_step_end(run, 20, step_metrics(20))  # t=104: 10 steps in 1 s
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["tok_per_s"] == 10_000


# --- TensorBoardLogger -------------------------------------------------------------------------
def test_tensorboard_logger_writes_scalars_that_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    drive(TensorBoardLogger(every=10), make_run(tmp_path), evals={20: 3.0})
    event_files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(s, pytest.approx(5.0 - 0.05 * s)) for s in (10, 20, 30, 40)]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(20, 3.0)]
    assert "perf/tok_per_s" in events.Tags()["scalars"]


def test_tensorboard_logger_says_how_to_install_when_missing(monkeypatch):
    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(
        ImportError, match=r"pip install 'llmfn\[tensorboard\]'.*logging.tensorboard=false"
    ):
        TensorBoardLogger()


def test_a_missing_tensorboard_is_a_value_error_naming_the_option(monkeypatch):
    from llmfn.callbacks.tensorboard_logger import check_tensorboard_installed

    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=r"logging.tensorboard=true needs .*pip install"):
        check_tensorboard_installed()


# --- LRMonitor ---------------------------------------------------------------------------------
def test_lr_monitor_prints_the_schedule_and_writes_the_lr_that_ran(tmp_path, capsys):
    config = from_dict(
        {"optim": {"lr": 1e-3, "min_lr": 1e-4, "schedule": "cosine", "warmup_steps": 5}}
    )
    drive(LRMonitor(every=10), make_run(tmp_path, config=config))
    out = capsys.readouterr().out
    assert (
        out == "lr schedule: cosine, linear warmup over 5 steps to 1.00e-03, decaying to 1.00e-04\n"
    )
    rows = (tmp_path / "lr.csv").read_text().splitlines()
    assert rows[0] == "step,lr"
    assert [(int(s), float(v)) for s, v in (r.split(",") for r in rows[1:])] == [
        (s, float(torch.tensor(s * 1e-5))) for s in (10, 20, 30, 40)
    ]


def test_the_schedule_line_warns_when_the_run_ends_inside_the_warmup():
    optim = from_dict({"optim": {"lr": 3e-4, "warmup_steps": 100}}).optim
    assert "warning" not in describe_schedule(optim, max_steps=100 + 1)
    first, warning = describe_schedule(optim, max_steps=2).splitlines()
    assert first == describe_schedule(optim)
    last_lr = float(lr_schedule_from_config(optim, 2)(torch.tensor(1)))  # the 2nd step's lr
    assert warning == (
        "warning: the run's 2 steps end inside optim.warmup_steps=100: the lr never exceeds "
        f"{last_lr:.2e} (lower optim.warmup_steps)"
    )
    assert f"{last_lr:.2e}" == "5.94e-06"


def test_lr_monitor_warns_once_without_an_lr_metric(tmp_path):
    monitor = LRMonitor(every=1, print_schedule=False)
    run = make_run(tmp_path)
    monitor.on_train_start(run)
    with pytest.warns(UserWarning, match="no 'lr' metric") as record:
        monitor.on_step_end(run, 1, {"loss": torch.tensor(1.0)})
        monitor.on_step_end(run, 2, {"loss": torch.tensor(1.0)})
    assert len(record) == 1


def test_lr_monitor_keeps_rows_up_to_the_resume_step(tmp_path):
    drive(LRMonitor(every=10, print_schedule=False), make_run(tmp_path, max_steps=40))
    drive(
        LRMonitor(every=10, print_schedule=False), make_run(tmp_path, max_steps=50, start_step=20)
    )
    steps = [int(r.split(",")[0]) for r in (tmp_path / "lr.csv").read_text().splitlines()[1:]]
    assert steps == [10, 20, 30, 40, 50]


def test_lr_monitor_does_nothing_off_rank_zero(tmp_path, capsys):
    drive(LRMonitor(every=1), make_run(tmp_path, is_main=False))
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""


# --- EarlyStopping -----------------------------------------------------------------------------
def feed(
    stopper: EarlyStopping, run: RunInfo, values: list[float], first_step: int = 1
) -> list[bool]:
    """stop_requested after each eval."""
    flags = []
    for index, value in enumerate(values):
        if run.stop_requested:  # the driver stops training: no more evals
            break
        stopper.on_eval(
            run, first_step + index, {"val_loss": value, "val_ppl": math.exp(min(value, 50))}
        )
        flags.append(run.stop_requested)
    return flags


def test_early_stopping_stops_after_exactly_patience_bad_evals(tmp_path, capsys):
    run = make_run(tmp_path)
    stopper = EarlyStopping(patience=3)
    # improve, improve, bad, bad (equal is not better), improve (resets), bad, bad, bad -> stop
    flags = feed(stopper, run, [3.0, 2.0, 2.5, 2.0, 1.9, 1.95, 1.9, 2.0])
    assert flags == [False] * 7 + [True]
    assert stopper.best == 1.9 and stopper.best_step == 5 and stopper.stopped_step == 8
    assert "early stopping at step 8" in capsys.readouterr().out


def test_early_stopping_min_delta_and_non_finite_values_count_as_bad(tmp_path):
    run = make_run(tmp_path)
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert feed(stopper, run, [2.0, 1.95]) == [False, False]  # 0.05 < min_delta: bad
    assert stopper.bad_evals == 1 and stopper.best == 2.0
    assert feed(stopper, run, [1.85]) == [False] and stopper.bad_evals == 0  # 0.15 > min_delta
    assert feed(stopper, run, [float("nan"), float("inf")]) == [False, True]


def test_early_stopping_state_survives_resume(tmp_path):
    run = make_run(tmp_path)
    before = EarlyStopping(patience=3)
    feed(before, run, [2.0, 2.1, 2.2])
    state = json.loads(json.dumps(CallbackList([before]).state_dict()))
    after = EarlyStopping(patience=3)
    CallbackList([after]).load_state_dict(state)
    assert (
        after.state_dict()
        == before.state_dict()
        == {
            "best": 2.0,
            "best_step": 1,
            "bad_evals": 2,
            "stopped_step": None,
        }
    )
    resumed_run = make_run(tmp_path, start_step=3)
    assert feed(after, resumed_run, [2.05], first_step=4) == [True]  # the third bad eval in a row


@settings(max_examples=20)
@given(
    values=st.lists(st.floats(0.5, 5.0), min_size=1, max_size=12),
    split=st.integers(0, 12),
    patience=st.integers(1, 4),
    min_delta=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_early_stopping_resume_matches_uninterrupted(
    tmp_path_factory, values, split, patience, min_delta
):
    run_dir = tmp_path_factory.mktemp("es")
    whole_run = make_run(run_dir, is_main=False)
    whole = EarlyStopping(patience, min_delta)
    whole_flags = feed(whole, whole_run, values)

    split = min(split, len(values))
    first_run = make_run(run_dir, is_main=False)
    first = EarlyStopping(patience, min_delta)
    first_flags = feed(first, first_run, values[:split])
    second_run = make_run(run_dir, is_main=False, stop_requested=first_run.stop_requested)
    second = EarlyStopping(patience, min_delta)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    second_flags = feed(second, second_run, values[split:], first_step=split + 1)

    assert first_flags + second_flags == whole_flags
    assert second.state_dict() == whole.state_dict()
    # The stop comes exactly `patience` evals after the last improvement.
    if True in whole_flags:
        assert whole_flags.index(True) + 1 - whole.best_step == patience


def test_early_stopping_explains_bad_arguments_and_a_missing_metric(tmp_path):
    with pytest.raises(ValueError, match="early_stopping_patience"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="early_stopping_min_delta"):
        EarlyStopping(patience=1, min_delta=-0.1)
    with pytest.raises(KeyError, match="monitors 'val_loss'.*accuracy"):
        EarlyStopping(patience=1).on_eval(make_run(tmp_path), 1, {"accuracy": 0.5})


def test_early_stopping_stops_every_rank_but_prints_only_on_rank_zero(tmp_path, capsys):
    run = make_run(tmp_path, is_main=False)
    assert feed(EarlyStopping(patience=1), run, [1.0, 1.0]) == [False, True]
    assert capsys.readouterr().out == ""


# --- SampleText --------------------------------------------------------------------------------
def test_sample_text_samples_at_eval_windows_and_at_the_end(tmp_path, capsys):
    calls = []

    def sample_fn(prompt: str, max_new_tokens: int) -> str:
        calls.append((prompt, max_new_tokens))
        return f"{prompt} sample {len(calls)}"

    sampler = SampleText(sample_every=30, prompt="Once", max_new_tokens=7)
    run = make_run(tmp_path, max_steps=110, sample_fn=sample_fn)
    drive(sampler, run, evals={20: 1.0, 40: 1.0, 60: 1.0, 80: 1.0, 100: 1.0})
    # windows of 30 steps: first eval at/after 30, 60, 90, then the end (110)
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("---") and "step" in line] == [
        f"--- sample at step {s} (prompt 'Once') ---" for s in (40, 60, 100, 110)
    ]
    assert calls == [("Once", 7)] * 4
    assert "Once sample 4" in out
    assert (tmp_path / "samples.txt").read_text().count("--- sample at step") == 4


def test_sample_text_does_not_sample_twice_at_the_last_eval(tmp_path):
    calls = []
    sampler = SampleText(sample_every=10, file_name=None)
    run = make_run(tmp_path, max_steps=20, sample_fn=lambda p, n: calls.append(n) or "text")
    drive(sampler, run, evals={10: 1.0, 20: 1.0})
    assert len(calls) == 2 and not (tmp_path / "samples.txt").exists()


def test_sample_text_only_at_the_end_by_default_and_never_off_rank_zero(tmp_path, capsys):
    calls = []
    sample_fn = lambda prompt, n: calls.append(n) or "text"  # noqa: E731
    drive(SampleText(), make_run(tmp_path, sample_fn=sample_fn), evals={10: 1.0, 20: 1.0})
    assert calls == [128]
    drive(
        SampleText(sample_every=10),
        make_run(tmp_path, sample_fn=sample_fn, is_main=False),
        evals={10: 1.0},
    )
    drive(SampleText(sample_every=10), make_run(tmp_path, sample_fn=None), evals={10: 1.0})
    assert calls == [128]
    assert capsys.readouterr().out.count("--- sample at step 40") == 1
    with pytest.raises(ValueError, match="train.sample_every"):
        SampleText(sample_every=-1)


# --- LossCurvePlot -----------------------------------------------------------------------------
def test_loss_curve_plot_writes_a_png_of_what_it_saw(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = LossCurvePlot(every=10)
    drive(CallbackList([plot]), make_run(tmp_path), evals={20: 3.0, 40: float("nan")})
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert plot.train == [[s, pytest.approx(5.0 - 0.05 * s)] for s in (10, 20, 30, 40)]
    assert plot.val == [[20, 3.0]]  # the NaN eval is left out
    assert f"loss curve: {tmp_path / 'loss_curve.png'}" in capsys.readouterr().out


def test_loss_curve_plot_state_covers_the_whole_run_after_resume(tmp_path):
    pytest.importorskip("matplotlib")
    first = LossCurvePlot(every=10)
    drive(first, make_run(tmp_path, max_steps=30), evals={20: 3.0})
    state = json.loads(json.dumps(first.state_dict()))
    second = LossCurvePlot(every=10)
    second.load_state_dict(state)
    drive(second, make_run(tmp_path, max_steps=40, start_step=20), evals={40: 2.0})
    assert [s for s, _ in second.train] == [10, 20, 30, 40]  # 30 from the first run dropped once
    assert second.val == [[20, 3.0], [40, 2.0]]


def test_loss_curve_plot_skips_with_a_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    drive(LossCurvePlot(every=5), make_run(tmp_path))
    assert not (tmp_path / "loss_curve.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_loss_curve_plot_writes_nothing_off_rank_zero(tmp_path, capsys):
    drive(LossCurvePlot(every=5), make_run(tmp_path, is_main=False), evals={10: 1.0})
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""


# --- Profiler ----------------------------------------------------------------------------------
class MatmulEachStep(Callback):
    """Torch work at the end of each step, under a `matmul at step <N>` range in the trace."""

    def on_step_end(self, run, step, metrics):
        with torch.profiler.record_function(f"matmul at step {step}"):
            weights = torch.ones(32, 32)
            (weights @ weights).sum()


def trace_names(path: Path) -> set[str]:
    events = json.loads(path.read_text())["traceEvents"]
    assert events
    return {event.get("name") for event in events}


def drive_until_error(callbacks: CallbackList, run: RunInfo, error_step: int) -> None:
    """The driver loop, raising inside step `error_step` (as a failing train step would)."""
    callbacks.on_train_start(run)
    for step in range(run.start_step + 1, run.max_steps + 1):
        if step == error_step:
            callbacks.on_exception(run, step, RuntimeError("out of memory"))
            return
        callbacks.on_step_end(run, step, step_metrics(step))


def test_profiler_records_the_steps_after_profile_at_and_writes_both_files(tmp_path, capsys):
    profiler = Profiler(profile_at=3, profile_steps=2)
    drive(CallbackList([MatmulEachStep(), profiler]), make_run(tmp_path, max_steps=8))
    folder = tmp_path / "profile"
    trace, top_ops = folder / "trace_steps_4-5.json", folder / "top_ops_steps_4-5.txt"
    assert sorted(folder.iterdir()) == [top_ops, trace]
    names = trace_names(trace)
    assert {"matmul at step 4", "matmul at step 5", "train step 4", "train step 5"} <= names
    assert not names & {"matmul at step 3", "matmul at step 6", "train step 6"}
    table = top_ops.read_text()
    assert "aten::mm" in table and "Self CPU" in table and "train step" not in table
    out = capsys.readouterr().out
    assert out.count("profiler:") == 1
    assert f"profiler: steps 4-5 recorded: trace {trace} (open in" in out
    assert f"top ops {top_ops}" in out
    assert not profiler.recording


@pytest.mark.parametrize("ending", ["max_steps", "stop_requested", "exception"])
def test_profiler_writes_what_it_recorded_when_training_ends_inside_the_window(
    tmp_path, capsys, ending
):
    profiler = Profiler(profile_at=2, profile_steps=10)
    callbacks = CallbackList([MatmulEachStep(), profiler])
    if ending == "exception":  # step 5 raises: steps 3, 4 and what ran of 5
        drive_until_error(callbacks, make_run(tmp_path, max_steps=40), error_step=5)
    elif ending == "stop_requested":  # early stopping after step 5
        stopper = Recorder()
        stopper.on_step_end = lambda run, step, metrics: setattr(run, "stop_requested", step == 5)
        callbacks.append(stopper)
        drive(callbacks, make_run(tmp_path, max_steps=40))
    else:  # profile_at + profile_steps > max_steps: it records what it can
        drive(callbacks, make_run(tmp_path, max_steps=5))
    trace = tmp_path / "profile" / "trace_steps_3-5.json"
    assert {"matmul at step 3", "matmul at step 4"} <= trace_names(trace)
    assert (tmp_path / "profile" / "top_ops_steps_3-5.txt").is_file()
    assert "profiler: steps 3-5 recorded" in capsys.readouterr().out
    assert not profiler.recording


def test_profiler_writes_nothing_off_rank_zero_or_outside_the_run(tmp_path, capsys):
    drive(CallbackList([MatmulEachStep(), Profiler(2)]), make_run(tmp_path, is_main=False))
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""
    # the run ends at step profile_at: the profiler never starts, and says why at the start
    drive(Profiler(profile_at=10), make_run(tmp_path, max_steps=10))
    assert list(tmp_path.iterdir()) == []
    assert "logging.profile_at=10 is not before the last step (10)" in capsys.readouterr().out


def test_a_run_resumed_at_or_after_profile_at_does_not_profile(tmp_path, capsys):
    for start_step in (10, 20):
        drive(Profiler(profile_at=10), make_run(tmp_path, start_step=start_step, max_steps=30))
        out = capsys.readouterr().out
        assert out.strip() == (
            f"profiler: not profiling: this run resumed at step {start_step}, "
            "at or after logging.profile_at=10"
        )
    assert list(tmp_path.iterdir()) == []
    drive(Profiler(profile_at=10, profile_steps=1), make_run(tmp_path, start_step=9))
    assert (tmp_path / "profile" / "trace_steps_11-11.json").is_file()


def test_profiler_on_a_gpu_records_kernels_and_synchronizes_around_the_window(
    tmp_path, monkeypatch, capsys
):
    synchronized, built = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    real_profile = torch.profiler.profile

    def recording_profile(**kwargs):
        built.append(kwargs)
        return real_profile(activities=[torch.profiler.ProfilerActivity.CPU])  # no GPU here

    monkeypatch.setattr("llmfn.callbacks.profiler.profile", recording_profile)
    gpu = torch.device("cuda:0")
    drive(Profiler(profile_at=2, profile_steps=2), make_run(tmp_path, max_steps=6, device=gpu))
    activities = torch.profiler.ProfilerActivity
    assert [b["activities"] for b in built] == [[activities.CPU, activities.CUDA]] * 2  # warm-up
    assert built[1]["record_shapes"] is False and built[1]["with_stack"] is False
    assert synchronized == [gpu, gpu]  # before starting and before stopping
    assert (tmp_path / "profile" / "top_ops_steps_3-4.txt").is_file()
    synchronized.clear()  # a failed step: a sync could raise again, so it writes without one
    run = make_run(tmp_path, max_steps=6, device=gpu)
    drive_until_error(CallbackList([Profiler(profile_at=2, profile_steps=3)]), run, error_step=4)
    assert synchronized == [gpu] and (tmp_path / "profile" / "trace_steps_3-4.json").is_file()


@pytest.mark.parametrize("key", ["profile_at", "profile_steps"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, None])
def test_profiler_and_its_config_keys_reject_bad_values(key, value):
    arguments = {"profile_at": 5, key: value}
    with pytest.raises(ValueError, match=rf"Profiler {key}=.*positive int \(logging\.{key}\)"):
        Profiler(**arguments)
    if value in (0, -1):
        with pytest.raises(
            ConfigError, match=rf"logging\.{key}={value} is invalid: expected a positive"
        ):
            from_dict({"logging": {key: value}})


# --- default_callbacks -------------------------------------------------------------------------
def names(callbacks: CallbackList) -> list[str]:
    return [type(c).__name__ for c in callbacks]


def test_default_callbacks_follow_the_config():
    config = from_dict({"logging": {"log_every": 5}})
    assert names(default_callbacks(config, is_main=True)) == [
        "SampleText",
        "ProgressBar",
        "ConsoleLogger",
        "JsonlLogger",
        "LRMonitor",
        "LossCurvePlot",
    ]
    callbacks = default_callbacks(config, is_main=True)
    assert [c.every for c in callbacks] == [1, 1, 5, 5, 5, 5]
    assert callbacks[1].log_every == 5  # the bar moves every step, refreshes its numbers every 5
    assert names(default_callbacks(config, is_main=False)) == []

    config = from_dict({"logging": {"profile_at": 50, "profile_steps": 4}})
    profiler = default_callbacks(config, is_main=True)[0]  # first: see defaults.py
    assert isinstance(profiler, Profiler) and (profiler.profile_at, profiler.profile_steps) == (
        50,
        4,
    )
    assert "Profiler" not in names(default_callbacks(config, is_main=False))

    config = from_dict(
        {
            "logging": {
                "console": False,
                "progress": False,
                "jsonl": False,
                "plot": False,
                "tensorboard": True,
            },
            "train": {
                "task": "regression",
                "early_stopping_patience": 4,
                "early_stopping_min_delta": 0.01,
            },
            "data": {"module": "regression"},
        }
    )
    assert names(default_callbacks(config, is_main=True)) == [
        "SampleText",  # inert: the driver gives a regression run no sample_fn
        "TensorBoardLogger",
        "LRMonitor",
        "EarlyStopping",
    ]
    stopper = default_callbacks(config, is_main=False)[0]
    assert isinstance(stopper, EarlyStopping) and (stopper.patience, stopper.min_delta) == (4, 0.01)


def test_default_callbacks_end_to_end_write_their_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    config = from_dict(
        {
            "logging": {"log_every": 5, "tensorboard": True, "progress": False},
            "train": {"sample_every": 20, "sample_tokens": 4, "early_stopping_patience": 2},
        }
    )
    callbacks = default_callbacks(config, is_main=True)
    run = make_run(tmp_path, config=config, max_steps=100, sample_fn=lambda prompt, n: "x" * n)
    drive(callbacks, run, evals={10: 3.0, 20: 2.0, 30: 2.5, 40: 2.4, 50: 1.0})
    assert run.stop_requested  # evals at 30 and 40 did not beat 2.0
    for name in ("metrics.jsonl", "lr.csv", "loss_curve.png", "samples.txt"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"] == 40
    out = capsys.readouterr().out
    assert (
        "early stopping at step 40" in out
        and "training finished at step 40 (stop requested)" in out
    )
    state = json.loads(json.dumps(callbacks.state_dict()))
    assert state["EarlyStopping"]["stopped_step"] == 40
