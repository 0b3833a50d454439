"""`python -m llmfn.train [CONFIG.yaml] [section.key=value ...]`: train a model.

Configuration precedence, lowest first: built-in defaults < the YAML file < environment
variables (LLMFN_SECTION__KEY=value, e.g. LLMFN_OPTIM__LR=3e-4) < command-line overrides
(section.key=value, e.g. optim.lr=3e-4 model.num_layers=4).

Multi-process: torchrun --nproc_per_node N -m llmfn.train CONFIG.yaml ...
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from llmfn.cli_output import closed_pipe_exit
from llmfn.config import Config, ConfigError, describe_keys, load_config, to_yaml
from llmfn.warning_format import prints_for_every_rank, use_one_line_warnings

SECTIONS = frozenset(field.name for field in dataclasses.fields(Config))
YAML = (".yaml", ".yml")

USAGE = """usage: python -m llmfn.train [CONFIG.yaml] [section.key=value ...] [--print-config]
       python -m llmfn.train --list-keys

Trains a model. Sections: model, data, optim, train, checkpoint, logging, distributed
(see docs/configuration.md). Precedence, lowest first: defaults < CONFIG.yaml <
environment LLMFN_SECTION__KEY=value < command-line section.key=value.
Text keys (str) take the value as written; null or ~ sets an optional one to None.

options:
  --print-config  print the resolved config as YAML and exit
  --list-keys     list every key with its type and default and exit

examples:
  python -m llmfn.train configs/tiny.yaml
  python -m llmfn.train configs/tiny.yaml optim.lr=1e-3 train.max_steps=200
  LLMFN_TRAIN__COMPILE=false python -m llmfn.train configs/tiny.yaml
  python -m llmfn.train configs/tiny.yaml train.resume=auto
  torchrun --nproc_per_node 2 -m llmfn.train configs/tiny.yaml
"""


def looks_like_path(arg: str) -> bool:
    """A config file rather than an override: no '=' (but for a missing file named like a key,
    `optim.lr`: an override without its value), or a YAML name whose text before the first '='
    is no dotted key (`runs/a=b.yaml`, `tiny=x.yaml`)."""
    if "=" not in arg:
        section = arg.split(".", 1)[0]
        named_like_a_key = "." in arg and section in SECTIONS and not arg.endswith(YAML)
        return not named_like_a_key or Path(arg).exists()
    before = arg.split("=", 1)[0]
    return arg.endswith(YAML) and ("/" in before or "." not in before)


def check_no_late_file(overrides: list[str], first_file: str | None) -> None:
    """A config file written after an override would read as a malformed override; a second
    one after the first, as a file that was merged."""
    for arg in overrides:
        if "=" not in arg and (arg.endswith(YAML) or Path(arg).exists()):
            where = (
                f"a second config file after {first_file!r}: give one"
                if first_file is not None
                else "a config file: the config file must come first"
            )
            raise ConfigError(
                f"'{arg}' looks like {where} (python -m llmfn.train CONFIG.yaml section.key=value ...)"
            )


def parse_args(argv: list[str]) -> tuple[Config, bool]:
    """(config, print_only) from the command line; raises ConfigError on bad input."""
    print_only = "--print-config" in argv
    args = [a for a in argv if a != "--print-config"]
    unknown_flags = [a for a in args if a.startswith("-")]
    if unknown_flags:
        raise ConfigError(
            f"unknown option {unknown_flags[0]!r} (overrides are written section.key=value)"
        )
    path = args[0] if args and looks_like_path(args[0]) else None
    overrides = args[1:] if path is not None else args
    check_no_late_file(overrides, path)
    return load_config(path, overrides), print_only


def print_answer(text: str) -> int:
    """Print `text` and exit 0, also when the reader stops early (`--list-keys | head`): a
    closed pipe ends the output quietly, as in other command-line tools."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        return closed_pipe_exit()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    use_one_line_warnings()
    if any(a in ("-h", "--help") for a in argv):
        return print_answer(USAGE)
    if "--list-keys" in argv:
        return print_answer(describe_keys())
    try:
        config, print_only = parse_args(argv)
    except ConfigError as err:  # every rank reads the same command line
        if prints_for_every_rank():
            print(f"error: {err}", file=sys.stderr)
        return 2
    if print_only:
        return print_answer(to_yaml(config))
    from llmfn.trainer import main_entry

    return main_entry(config)


if __name__ == "__main__":
    sys.exit(main())
