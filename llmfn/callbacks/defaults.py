"""The callbacks a run gets from its config (`logging.*` and `train.*`)."""

from __future__ import annotations

from llmfn.callbacks.base import CallbackList
from llmfn.callbacks.console import ConsoleLogger
from llmfn.callbacks.early_stopping import EarlyStopping
from llmfn.callbacks.jsonl import JsonlLogger
from llmfn.callbacks.loss_curve import LossCurvePlot
from llmfn.callbacks.lr_monitor import LRMonitor
from llmfn.callbacks.profiler import Profiler
from llmfn.callbacks.progress import ProgressBar
from llmfn.callbacks.sample_text import SampleText
from llmfn.callbacks.tensorboard_logger import TensorBoardLogger


def default_callbacks(config, *, is_main: bool) -> CallbackList:
    """The standard set for `config` (an llmfn.config.Config).

    Callbacks that print or write are built on rank 0 only; EarlyStopping is built on every rank
    so all ranks stop at the same step. SampleText (inert for a task that does not generate text:
    the driver gives such a run no `sample_fn`) comes early: the loggers restart their throughput
    clocks in `on_eval`, after the sample, so sampling time is not counted as training. Profiler (when `logging.profile_at` is set) comes first, so writing its
    trace at the end of a step falls in the loggers' throughput window that holds the profiled
    steps (already slow) rather than in the next one, and the final sample is not profiled.
    """
    log, train = config.logging, config.train
    callbacks = []
    if is_main and log.profile_at is not None:
        callbacks.append(Profiler(log.profile_at, log.profile_steps))
    if is_main:
        callbacks.append(SampleText(train.sample_every, train.sample_prompt, train.sample_tokens))
    if is_main and log.progress:
        callbacks.append(ProgressBar(log.log_every))
    if is_main and log.console:
        callbacks.append(ConsoleLogger(log.log_every))
    if is_main and log.jsonl:
        callbacks.append(JsonlLogger(log.log_every))
    if is_main and log.tensorboard:
        callbacks.append(TensorBoardLogger(log.log_every))
    if is_main:
        callbacks.append(LRMonitor(log.log_every, print_schedule=log.console))
    if train.early_stopping_patience is not None:
        callbacks.append(
            EarlyStopping(train.early_stopping_patience, train.early_stopping_min_delta)
        )
    if is_main and log.plot:
        callbacks.append(LossCurvePlot(log.log_every))
    return CallbackList(callbacks)
