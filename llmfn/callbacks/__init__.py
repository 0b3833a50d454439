"""Training callbacks: hooks the driver calls around the compiled train step.

    callbacks = default_callbacks(config, is_main=rank == 0)   # or CallbackList([...])
    callbacks.on_train_start(run)
    callbacks.on_step_end(run, step, metrics)                   # each runs every `cb.every` steps

See docs/callbacks.md for how to write one.
"""

from llmfn.callbacks.base import Callback, CallbackList, FileCallback, RunInfo
from llmfn.callbacks.console import ConsoleLogger
from llmfn.callbacks.defaults import default_callbacks
from llmfn.callbacks.early_stopping import EarlyStopping
from llmfn.callbacks.jsonl import JsonlLogger, read_jsonl
from llmfn.callbacks.loss_curve import LossCurvePlot
from llmfn.callbacks.lr_monitor import LRMonitor
from llmfn.callbacks.output import write_line
from llmfn.callbacks.profiler import Profiler
from llmfn.callbacks.progress import ProgressBar
from llmfn.callbacks.sample_text import SampleText
from llmfn.callbacks.scalars import to_floats
from llmfn.callbacks.tensorboard_logger import TensorBoardLogger
from llmfn.callbacks.throughput import Throughput, TimedCallback, model_flops_utilization

__all__ = [
    "Callback",
    "FileCallback",
    "CallbackList",
    "ConsoleLogger",
    "EarlyStopping",
    "JsonlLogger",
    "LRMonitor",
    "LossCurvePlot",
    "Profiler",
    "ProgressBar",
    "RunInfo",
    "SampleText",
    "TensorBoardLogger",
    "Throughput",
    "TimedCallback",
    "default_callbacks",
    "model_flops_utilization",
    "read_jsonl",
    "to_floats",
    "write_line",
]
