"""Run configuration: one dataclass per section, loaded from YAML with overrides.

Precedence, lowest first: dataclass defaults < YAML file < environment (`LLMFN_OPTIM__LR=3e-4`)
< command line (`optim.lr=3e-4`). Every problem raises one `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmfn.model_config import ModelConfig

ENV_PREFIX = "LLMFN_"
NULLS = ("null", "Null", "NULL", "~")  # how a text key given on the command line is set to None
INT64_LIMIT = 2**63  # int keys become int64 tensors or Python ints torch and math must take


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what was expected."""


@dataclass(frozen=True)
class DataConfig:
    module: str = "stdlib"  # stdlib | text | token_bin | sft | synthetic | regression
    path: str | None = None  # text file/folder, token-bin folder, or SFT JSONL (by module)
    tokenizer: str = "bpe"  # char | bpe | path/to/tokenizer.json
    tokenizer_vocab_size: int = 2048  # when training a BPE tokenizer
    batch_size: int = 8  # sequences per micro-batch per process
    val_fraction: float = 0.05
    val_batches: int = 8  # batches per validation pass
    cache_dir: str = ".cache/llmfn"  # where prepared data of the stdlib/text modules lives
    max_files: int | None = None  # stdlib/text: use at most this many files
    pack: bool = True  # sft: pack examples into full rows (else pad each)
    synthetic_size: int = 4096  # synthetic/regression: number of examples
    regression_features: int = 16  # regression: input width
    synthetic_vocab_size: int = 256  # synthetic: token ids drawn from [0, this)
    errors: str = "strict"  # text/stdlib: undecodable UTF-8 -> strict (error) | replace | ignore


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | lion
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # floor the schedule decays to
    schedule: str = "cosine"  # constant | linear | cosine | wsd
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    decay_embeddings: bool = False  # apply weight decay to embeddings (norms and biases never)
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping


@dataclass(frozen=True)
class TrainConfig:
    task: str = "lm"  # lm | sft | regression
    max_steps: int = 1000
    epochs: int | None = None  # if set, run this many passes over the data instead of max_steps
    grad_accum_steps: int = 1
    compile: bool = True
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds dynamic loss scaling)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool | None = None  # deterministic algorithms; None = on CPU, off on GPU
    eval_every: int = 100
    sample_every: int = 0  # lm: print a sample at eval time every N steps (0 = only at the end)
    sample_tokens: int = 128
    sample_prompt: str = ""
    early_stopping_patience: int | None = None  # evals without improvement before stopping
    early_stopping_min_delta: float = 0.0
    nonfinite: str = "skip"  # skip | halt
    max_nonfinite: int = 10  # skip: halt after this many non-finite steps in a row
    run_dir: str = "runs"
    run_name: str | None = None  # default: a timestamp
    resume: str | None = None  # None | auto | path to a checkpoint folder


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between saves (0 = only at the end)
    keep_last_n: int = 3
    save_best: bool = True  # keep the checkpoint with the lowest validation loss as best/
    save_at_end: bool = True
    # a fresh run's initial params: a checkpoint, run folder or weights folder (export,
    # import_hf); a fresh optimizer, step and schedule. None = init_params(seed)
    init_from: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 10
    console: bool = True
    progress: bool = True  # tqdm bar with loss, tok/s, MFU (GPU) and ETA
    jsonl: bool = True
    tensorboard: bool = False  # needs the `tensorboard` extra
    plot: bool = True  # loss curve PNG at the end (needs matplotlib)
    profile_at: int | None = None  # torch.profiler trace of the steps after this one; None = off
    profile_steps: int = 3  # steps the profiler records


@dataclass(frozen=True)
class DistributedConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


PATH_KEYS = {  # keys naming a file or folder (`~` expands) -> what the key expects
    "data.path": "a file or folder path (or null)",
    "data.tokenizer": "char, bpe or the path of a tokenizer.json",
    "data.cache_dir": "a folder path",
    "train.run_dir": "a folder path",
    "train.resume": "auto, a checkpoint path or null",
    "checkpoint.init_from": "a folder path or null",
}
CHOICES = {
    ("data", "module"): ("stdlib", "text", "token_bin", "sft", "synthetic", "regression"),
    ("optim", "name"): ("adamw", "sgd", "lion"),
    ("optim", "schedule"): ("constant", "linear", "cosine", "wsd"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "nonfinite"): ("skip", "halt"),
    ("distributed", "backend"): ("auto", "nccl", "gloo"),
    ("data", "errors"): ("strict", "replace", "ignore"),
}


# --- typing helpers ---------------------------------------------------------------------------
def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _options(tp) -> tuple:
    """The types an annotation allows: (int, NoneType) for `int | None`, (str,) for `str`."""
    union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    return typing.get_args(tp) if union else (tp,)


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


def _whole_number(value) -> int | None:
    """The int a float or numeric string holds when it is a whole number (1000.0, '1e3': YAML
    1.1 reads 1e3 as a string), else None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return int(value) if isinstance(value, float) and value.is_integer() else None


def _coerce(key: str, value, tp, source: str = ""):
    """Check `value` against the annotation `tp` (int widens to float, a whole number narrows
    to int); raise ConfigError, naming where the value was written (`source`)."""
    for option in _options(tp):
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is int and (whole := _whole_number(value)) is not None:
            return whole
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML 1.1 reads 2e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
    raise ConfigError(f"{key}={value!r}{source} has the wrong type: expected {_type_name(tp)}")


def _sections_with(name: str) -> list[str]:
    """The config sections that have a key called `name`, in section order."""
    return [section for section, cls in _field_types(Config).items() if name in _field_types(cls)]


def _unknown(key: str, name: str, known: list[str], source: str = "") -> ConfigError:
    prefix = key[: -len(name)]
    close = difflib.get_close_matches(name, known, n=1)
    owners = _sections_with(name) if prefix else []
    if close:
        hint = f" (did you mean '{prefix}{close[0]}'?)"
    elif owners:
        hint = f" (did you mean '{owners[0]}.{name}'?)"
    else:
        hint = f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"unknown config key '{key}'{source}{hint}")


def _dotted(key: str, source: str) -> ConfigError:
    """A dotted section key, as in a YAML file holding `optim.lr: 1e-3`."""
    head, rest = key.split(".", 1)
    return ConfigError(
        f"config key '{key}'{source} is dotted, but YAML files nest keys: "
        f"write it nested: {head}: {{{rest}: ...}}"
    )


def _not_a_section(section: str, values, source: str = "") -> ConfigError:
    return ConfigError(
        f"config section '{section}'{source} must be a mapping of keys to values "
        f"(or empty), got {values!r}"
    )


def _check_keys(tree: dict, source) -> None:
    """Unknown sections and keys of one layer of the config, named with `source(key)` (where
    the key was written), before the layers are merged and that is lost."""
    sections = _field_types(Config)
    for written, values in tree.items():
        section = str(written)  # YAML keys may be numbers or null
        if isinstance(written, str) and "." in written:  # overrides and variables are split
            raise _dotted(section, source(section))
        if section not in sections:
            raise _unknown(section, section, list(sections), source(section))
        if values is not None and not isinstance(values, dict):
            raise _not_a_section(section, values, source(section))
        known = _field_types(sections[section])
        for written_name, value in (values or {}).items():
            name = str(written_name)
            key = f"{section}.{name}"
            if name not in known:
                raise _unknown(key, name, list(known), source(key))
            _check_value(section, name, _coerce(key, value, known[name], source(key)), source(key))


def _check_value(section: str, name: str, value, source: str = "") -> None:
    """A key's value that no type says is wrong: one of its CHOICES, a usable path."""
    key = f"{section}.{name}"
    allowed = CHOICES.get((section, name))
    if allowed and value not in allowed:
        raise ConfigError(
            f"{key}={value!r}{source} is invalid: expected one of {', '.join(allowed)}"
        )
    if key in PATH_KEYS and value == "":
        raise ConfigError(f"{key}=''{source} is invalid: expected {PATH_KEYS[key]}")


# --- building ---------------------------------------------------------------------------------
def _merge(tree: dict, updates: dict) -> dict:
    out = dict(tree)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict, dotted: str, value, source: str = "") -> None:
    """tree[section][key] = value for dotted = 'section.key'."""
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"config key '{dotted}'{source} is invalid: keys are section.key (e.g. optim.lr)"
        )
    section, key = parts
    tree.setdefault(section, {})[key] = value


def _build_section(section: str, cls, values: dict):
    if not isinstance(values, dict):
        raise _not_a_section(section, values)
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in types_:
            raise _unknown(key, name, list(types_))
        value = _coerce(key, value, types_[name])
        _check_value(section, name, value)
        if key in PATH_KEYS and value is not None:
            value = os.path.expanduser(value)  # a shell leaves `key=~/x` as written
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


POSITIVE_KEYS = (  # expected > 0; None (an optional key left unset) passes
    "data.batch_size",
    "train.max_steps",
    "train.epochs",
    "train.grad_accum_steps",
    "train.eval_every",
    "optim.lr",
    "optim.grad_clip",
    "logging.log_every",
    "logging.profile_at",
    "logging.profile_steps",
    "checkpoint.keep_last_n",
    "train.max_nonfinite",
    "train.sample_tokens",
    "train.early_stopping_patience",
    "data.val_batches",
    "data.max_files",
    "data.synthetic_size",
    "data.synthetic_vocab_size",
    "data.regression_features",
    "data.tokenizer_vocab_size",
    "distributed.timeout_s",
)
# (keys, in_range(value), the range the message expects); checked once every float is finite
RANGES = (
    (
        ("optim.beta1", "optim.beta2", "optim.momentum", "data.val_fraction"),
        lambda v: 0 <= v < 1,
        "a float in [0, 1)",
    ),
    (
        (
            "optim.eps",
            "optim.weight_decay",
            "optim.warmup_steps",
            "train.early_stopping_min_delta",
            "train.sample_every",
        ),
        lambda v: v >= 0,
        ">= 0",
    ),
    (("optim.decay_fraction",), lambda v: 0 < v <= 1, "a float in (0, 1]"),
    (("checkpoint.every",), lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    (
        ("train.seed",),
        lambda v: 0 <= v < 2**63,
        "an integer in [0, 2**63) (a 64-bit signed tensor in the train state; numpy and torch "
        "seeds take it too)",
    ),
)
NEEDS_PATH = ("text", "token_bin", "sft")  # data modules that read data.path
TOKENIZED = ("stdlib", "text", "sft")  # data modules that train data.tokenizer char or bpe
HOLDS_OUT = ("stdlib", "text", "sft", "synthetic", "regression")  # read data.val_fraction
TASK_MODULES = {"regression": "regression", "sft": "sft"}  # train.task -> the data.module it needs


def _value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_ranges(cfg: Config) -> None:
    """Each key on its own: positive, finite, within its range, within int64."""
    for key in POSITIVE_KEYS:
        value = _value(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value!r} is invalid: expected a positive number")
    for key, value in _values_of(cfg, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} is invalid: expected a finite number")
    for keys, in_range, expected in RANGES:
        for key in keys:
            value = _value(cfg, key)
            if not in_range(value):
                raise ConfigError(f"{key}={value} is invalid: expected {expected}")
    for key, value in _values_of(cfg, int):
        if not -INT64_LIMIT <= value < INT64_LIMIT:
            raise ConfigError(f"{key}={value} is invalid: expected an integer below 2**63")


def _check_combinations(cfg: Config) -> None:
    """What a single key's range cannot say: a valid run name, min_lr <= lr, nesterov with
    momentum, the data a module or a task needs."""
    name = cfg.train.run_name
    if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
        raise ConfigError(
            f"train.run_name={name!r} is invalid: expected a folder name (no '/', not '.' or '..'); "
            "train.run_dir says where runs go"
        )
    if not 0 <= cfg.optim.min_lr <= cfg.optim.lr:
        raise ConfigError(
            f"optim.min_lr={cfg.optim.min_lr} is invalid: expected 0 <= min_lr <= optim.lr={cfg.optim.lr}"
        )
    if cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError(
            "optim.nesterov=true is invalid with optim.momentum=0: expected optim.momentum > 0 "
            "(or optim.nesterov=false)"
        )
    if cfg.data.module in NEEDS_PATH and not cfg.data.path:
        raise ConfigError(
            f"data.module={cfg.data.module!r} needs data.path (a file or folder to read)"
        )
    module = TASK_MODULES.get(cfg.train.task)
    if module is not None and cfg.data.module != module:
        raise ConfigError(f"train.task={cfg.train.task!r} needs data.module={module!r}")
    _check_tokenizer_vocab(cfg.data)
    _check_validation_data(cfg)
    if cfg.checkpoint.init_from is not None and cfg.train.task == "regression":
        raise ConfigError(
            "checkpoint.init_from starts a language model from saved weights: it applies to "
            "train.task lm or sft, not regression"
        )


def _check_validation_data(cfg: Config) -> None:
    """Early stopping watches val_loss: a module that holds out data.val_fraction=0 has none."""
    patience = cfg.train.early_stopping_patience
    if patience is not None and cfg.data.module in HOLDS_OUT and cfg.data.val_fraction == 0:
        raise ConfigError(
            f"train.early_stopping_patience={patience} needs validation data, but "
            "data.val_fraction=0 holds none out: raise data.val_fraction (or unset "
            "train.early_stopping_patience)"
        )


def _check_tokenizer_vocab(data: DataConfig) -> None:
    """A char or bpe tokenizer that the data module trains has room for its special tokens."""
    from llmfn.data.tokenizer import MIN_VOCAB_SIZES

    minimum, why = MIN_VOCAB_SIZES.get(data.tokenizer, (0, ""))
    if data.module in TOKENIZED and data.tokenizer_vocab_size < minimum:
        raise ConfigError(
            f"data.tokenizer_vocab_size={data.tokenizer_vocab_size} is invalid for "
            f"data.tokenizer={data.tokenizer!r}: expected at least {minimum} ({why})"
        )


def _values_of(cfg: Config, kind: type):
    """(dotted key, value) for every field of every section whose value is a `kind` (bools are
    not ints here)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for key in dataclasses.fields(values):
            value = getattr(values, key.name)
            if isinstance(value, kind) and not isinstance(value, bool):
                yield f"{section.name}.{key.name}", value


def from_dict(tree: dict) -> Config:
    """A validated Config from a nested dict of sections (missing keys keep their defaults)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    sections = _field_types(Config)
    built = {}
    for name, values in tree.items():
        if name not in sections:
            raise _unknown(name, name, list(sections))
        built[name] = _build_section(name, sections[name], {} if values is None else values)
    cfg = Config(**built)
    _check_ranges(cfg)
    _check_combinations(cfg)
    return cfg


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one YAML mapping: the message names the lines of both."""

    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"line {line}: duplicate key '{key}' (first on line {first_line})")


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last
    one, silently dropping the first)."""

    def construct_document(self, node):
        _check_unique_keys(node, "", set())
        return super().construct_document(node)


def _check_unique_keys(node: yaml.Node, prefix: str, visited: set[int]) -> None:
    """Raise DuplicateKeyError for the first repeated scalar key in any mapping under `node`,
    named with its dotted path; merge keys (<<) and nodes reached again by alias are skipped."""
    if id(node) in visited or not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, prefix, visited)
        return
    first_lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key, line = prefix + key_node.value, key_node.start_mark.line + 1
            if key in first_lines:
                raise DuplicateKeyError(key, line, first_lines[key])
            first_lines[key] = line
            _check_unique_keys(value_node, key + ".", visited)


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file; a missing, unreadable or malformed file (or one that writes a
    key twice) is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (or is not a file)")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err}") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"config file '{path}' {err}: write each key once") from None
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error(path, err)) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections, got {type(tree).__name__}"
        )
    return tree


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: FILE:LINE:COL: problem (context)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return f"config file '{path}' is not valid YAML: {' '.join(str(err).split())}"
    context = getattr(err, "context", None)
    where = f" ({context})" if context and len(context) <= 60 else ""
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}{where}"


def _is_text(tp) -> bool:
    """A `str` or `str | None` key: its command-line value is taken as written."""
    options = _options(tp)
    return str in options and set(options) <= {str, type(None)}


def parse_value(text: str, tp=None):
    """A CLI/env value for a key annotated `tp`. A text key (`str`, `str | None`) keeps the text
    as written (train.run_name=2024, train.sample_prompt='Q: '), but for null or ~ where None is
    allowed. Any other key (or `tp` None) reads it as YAML would: 3 -> int, 0.1 -> float, true ->
    bool, null (or None) -> None. YAML 1.1 leaves 3e-4 a string: float keys accept such strings
    (`_coerce`)."""
    if tp is not None and _is_text(tp):
        return None if text in NULLS and type(None) in _options(tp) else text
    if text == "":  # `optim.lr=` (an unset shell variable): an error, not null
        return text
    if text in ("None", "none"):
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _key_type(dotted: str):
    """The annotation of a dotted key (optim.lr -> float); None for an unknown key."""
    section, _, name = dotted.partition(".")
    cls = _field_types(Config).get(section)
    return _field_types(cls).get(name) if cls is not None else None


def env_variable(key: str) -> str:
    """The environment variable that sets a dotted key: optim.lr -> LLMFN_OPTIM__LR."""
    return ENV_PREFIX + key.upper().replace(".", "__")


def env_variable_for(key: str, environ: typing.Mapping[str, str]) -> str:
    """The variable in `environ` that set `key` (a dotted key or a section)."""
    prefix = env_variable(key)
    return next((name for name in environ if name.startswith(prefix)), prefix)


def env_overrides(environ: typing.Mapping[str, str]) -> dict:
    """{section: {key: value}} from variables like LLMFN_OPTIM__LR=3e-4."""
    tree: dict = {}
    for name, text in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            source = f" in environment variable {name}"
            _set_dotted(tree, dotted, parse_value(text, _key_type(dotted)), source)
    return tree


def _section_hint(name: str, text: str) -> str:
    """How to write `name=text` with a section: the sections that have the key, if any."""
    sections = _field_types(Config)
    if name in sections:
        return f"sets a whole section: set one of its keys, e.g. {name}.<key>={text}"
    example = " or ".join(f"{s}.{name}={text}" for s in _sections_with(name)) or "section.key=value"
    return f"needs a section: write {example}"


def cli_overrides(args: list[str]) -> dict:
    """{section: {key: value}} from arguments like optim.lr=3e-4; of a key given twice, the last
    one (a script's base arguments, then the run's)."""
    tree: dict = {}
    for arg in args:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(
                f"override '{arg}' is not of the form section.key=value (e.g. optim.lr=3e-4)"
            )
        dotted, text = arg.split("=", 1)
        if "." not in dotted:
            raise ConfigError(f"override '{arg}' {_section_hint(dotted, text)}")
        _set_dotted(tree, dotted, parse_value(text, _key_type(dotted)))
    return tree


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] = (),
    environ: typing.Mapping[str, str] | None = None,
) -> Config:
    """defaults < YAML file at `path` < LLMFN_* environment < `overrides` (section.key=value)."""
    from_file = read_yaml(path) if path is not None else {}
    env = os.environ if environ is None else environ
    from_env = env_overrides(env)
    from_cli = cli_overrides(list(overrides))
    _check_keys(from_file, lambda key: f" in {path}")
    _check_keys(from_env, lambda key: f" in environment variable {env_variable_for(key, env)}")
    _check_keys(from_cli, lambda key: "")
    return from_dict(_merge(_merge(from_file, from_env), from_cli))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def key_rows() -> list[tuple[str, str, str]]:
    """(section.key, type, default as YAML writes it) for every config key, in section order."""
    defaults = Config().to_dict()
    return [
        (f"{section}.{name}", _type_name(tp), _yaml_scalar(defaults[section][name]))
        for section, cls in _field_types(Config).items()
        for name, tp in _field_types(cls).items()
    ]


def _yaml_scalar(value) -> str:
    return yaml.safe_dump(value).removesuffix("...\n").strip()


def describe_keys() -> str:
    """Every config key with its type and default, one per line (`--list-keys`)."""
    rows = [("key", "type", "default"), *key_rows()]
    widths = [max(len(row[i]) for row in rows) for i in (0, 1)]
    return "\n".join(f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d}" for k, t, d in rows)
