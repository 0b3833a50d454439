"""Config loading: precedence, type checks, and one clear error per bad input."""

import subprocess
import sys

import pytest

from llmfn.config import ConfigError, from_dict, key_rows, load_config, read_yaml, to_yaml
from llmfn.train import main, parse_args


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_env_cli(tmp_path):
    path = write(
        tmp_path,
        "optim:\n  lr: 0.001\n  warmup_steps: 7\ntrain:\n  max_steps: 50\nmodel:\n  num_layers: 3\n",
    )
    env = {"LLMFN_OPTIM__LR": "0.002", "LLMFN_TRAIN__MAX_STEPS": "60", "UNRELATED": "x"}
    cfg = load_config(path, ["optim.lr=3e-4"], env)
    assert cfg.optim.lr == 3e-4  # CLI beats env and YAML
    assert cfg.train.max_steps == 60  # env beats YAML
    assert cfg.optim.warmup_steps == 7  # YAML beats defaults
    assert cfg.model.num_layers == 3
    assert cfg.optim.beta1 == 0.9  # default kept


def test_values_are_parsed_like_yaml():
    cfg = load_config(
        None,
        ["train.compile=false", "optim.grad_clip=null", "model.num_kv_heads=2", "optim.lr=1e-3"],
        {},
    )
    assert cfg.train.compile is False and cfg.optim.grad_clip is None
    assert cfg.model.num_kv_heads == 2 and cfg.optim.lr == 1e-3


def test_int_widens_to_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"], {}).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.max_steps=1.5 has the wrong type: expected int"):
        load_config(None, ["train.max_steps=1.5"], {})


def test_int_fields_take_whole_numbers_however_written(tmp_path):
    cfg = load_config(None, ["train.max_steps=1e3", "train.eval_every=2.5e2"], {})
    assert cfg.train.max_steps == 1000 and cfg.train.eval_every == 250
    assert isinstance(cfg.train.max_steps, int)
    assert (
        load_config(write(tmp_path, "train:\n  max_steps: 2e3\n"), [], {}).train.max_steps == 2000
    )
    with pytest.raises(
        ConfigError, match=r"train.max_steps='1e-3' has the wrong type: expected int"
    ):
        load_config(None, ["train.max_steps=1e-3"], {})


def test_override_values_are_read_for_the_field_they_set():
    cfg = load_config(None, ["train.run_name=1e3", "optim.lr=2e-3", "optim.eps=1e-8"], {})
    assert cfg.train.run_name == "1e3"  # a folder name, not 1000.0
    assert cfg.optim.lr == 2e-3 and cfg.optim.eps == 1e-8
    env = {"LLMFN_TRAIN__RUN_NAME": "5e2", "LLMFN_OPTIM__MIN_LR": "1e-4"}
    cfg = load_config(None, [], env)
    assert cfg.train.run_name == "5e2" and cfg.optim.min_lr == 1e-4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["optim.lrr=1"], r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        (["optimizer.lr=1"], r"unknown config key 'optimizer' \(did you mean 'optim'\?\)"),
        (
            ["optim.precision=bf16"],
            r"unknown config key 'optim.precision' \(did you mean 'train.precision'\?\)",
        ),
        (
            ["train.precision=fp8"],
            r"train.precision='fp8' is invalid: expected one of fp32, bf16, fp16",
        ),
        (
            ["model.num_heads=3"],
            r"model.hidden_size=256 is invalid: expected a multiple of num_heads=3",
        ),
        (
            ["model.num_kv_heads=3"],
            r"model.num_kv_heads=3 is invalid: expected a divisor of num_heads=4",
        ),
        (["model.position=xpos"], r"model.position='xpos' is invalid: expected one of"),
        (["optim.lr=abc"], r"optim.lr='abc' has the wrong type: expected float"),
        (["optim.min_lr=1.0"], r"optim.min_lr=1.0 is invalid: expected 0 <= min_lr <= optim.lr"),
        (["data.module=text"], r"data.module='text' needs data.path"),
        (["optim.lr=.inf"], r"optim.lr=inf is invalid: expected a finite number"),
        (["optim.beta1=1.5"], r"optim.beta1=1.5 is invalid: expected a float in \[0, 1\)"),
        (["optim.weight_decay=-1"], r"optim.weight_decay=-1.0 is invalid: expected >= 0"),
        (["data.val_batches=0"], r"data.val_batches=0 is invalid: expected a positive number"),
        (["train.run_name=../x"], r"train.run_name='../x' is invalid: expected a folder name"),
        (["max_steps=3"], r"override 'max_steps=3' needs a section: write train.max_steps=3"),
        (["optim=3"], r"override 'optim=3' sets a whole section: .* e.g. optim.<key>=3"),
        (
            ["train.early_stopping_patience=0"],
            r"train.early_stopping_patience=0 is invalid: expected a positive number",
        ),
        (["train.sample_tokens=0"], r"train.sample_tokens=0 is invalid: expected a positive"),
        (["train.sample_every=-5"], r"train.sample_every=-5 is invalid: expected >= 0"),
        (
            ["data.tokenizer=char", "data.tokenizer_vocab_size=3"],
            r"data.tokenizer_vocab_size=3 is invalid for data.tokenizer='char': expected at "
            r"least 4 \(3 special tokens \+ 1 character\)",
        ),
        (
            ["data.tokenizer_vocab_size=257"],
            r"data.tokenizer_vocab_size=257 is invalid for data.tokenizer='bpe': expected at "
            r"least 258 \(256 bytes \+ 2 special tokens\)",
        ),
        (["train.seed=-1"], r"train.seed=-1 is invalid: expected an integer in \[0, 2\*\*63\)"),
        (
            ["train.seed=9223372036854775808"],  # 2**63: no int64 (the state's rng tensor)
            r"train.seed=9223372036854775808 is invalid: expected an integer in \[0, 2\*\*63\)",
        ),
        (
            ["optim.name=sgd", "optim.nesterov=true", "optim.momentum=0"],
            r"optim.nesterov=true is invalid with optim.momentum=0: expected optim.momentum > 0",
        ),
        (["lr=1"], r"needs a section"),
        (["optim.lr"], r"not of the form section.key=value"),
        (["optim.lr.x=1"], r"config key 'optim.lr.x' is invalid: keys are section.key"),
        (["optim..lr=1"], r"config key 'optim..lr' is invalid: keys are section.key"),
        (["optim.lr="], r"optim.lr='' has the wrong type: expected float"),
        (
            ["train.resume="],
            r"train.resume='' is invalid: expected auto, a checkpoint path or null",
        ),
        (["train.run_dir="], r"train.run_dir='' is invalid: expected a folder path"),
        (["data.cache_dir="], r"data.cache_dir='' is invalid: expected a folder path"),
        (["checkpoint.init_from="], r"checkpoint.init_from='' is invalid: expected a folder path"),
        (["data.tokenizer="], r"data.tokenizer='' is invalid: expected char, bpe or the path"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override, {})


def test_unknown_keys_name_the_variable_or_file_they_came_from(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"'optim.lrr' in environment variable LLMFN_OPTIM__LRR \(did you mean 'optim.lr'",
    ):
        load_config(None, [], {"LLMFN_OPTIM__LRR": "1"})
    with pytest.raises(
        ConfigError, match=r"'optimizer' in environment variable LLMFN_OPTIMIZER__LR"
    ):
        load_config(None, [], {"LLMFN_OPTIMIZER__LR": "1"})
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"'train.max_step' in .*x.yaml \(did you mean"):
        load_config(path, [], {})
    for text, key in [("1: 2\n", "1"), ("model: {1: 2}\n", "model.1"), ("null: {}\n", "None")]:
        path.write_text(text)  # YAML keys that are not strings
        with pytest.raises(ConfigError, match=rf"unknown config key '{key}' in .*x.yaml"):
            load_config(path, [], {})


def test_bad_values_name_the_variable_or_file_they_came_from(tmp_path):
    for environ, message in [
        ({"LLMFN_OPTIM__LR": "abc"}, r"optim.lr='abc' in environment variable LLMFN_OPTIM__LR has"),
        ({"LLMFN_OPTIM__LR": ""}, r"optim.lr='' in environment variable LLMFN_OPTIM__LR has"),
        ({"LLMFN_TRAIN__PRECISION": "fp8"}, r"'fp8' in environment variable LLMFN_TRAIN__PRE"),
        ({"LLMFN_TRAIN__RESUME": ""}, r"train.resume='' in environment variable LLMFN_TRAIN__"),
        ({"LLMFN_OPTIM__LR__X": "1"}, r"'optim.lr.x' in environment variable LLMFN_OPTIM__LR__X"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [], environ)
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"train.max_steps='many' in .*x.yaml has the wrong type"):
        load_config(path, [], {})


def test_of_a_key_given_twice_on_the_command_line_the_last_wins():
    assert (
        load_config(None, ["optim.lr=1e-3", "train.max_steps=3", "optim.lr=2e-3"], {}).optim.lr
        == 2e-3
    )


def test_paths_expand_a_leading_tilde(monkeypatch, tmp_path):
    """A shell expands ~ only at a word's start: `train.run_dir=~/runs` reaches us as written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["train.run_dir=~/runs", "data.cache_dir=~/cache"], {})
    assert (cfg.train.run_dir, cfg.data.cache_dir) == (f"{tmp_path}/runs", f"{tmp_path}/cache")
    assert load_config(None, ["train.run_name=~x"], {}).train.run_name == "~x"  # not a path


def test_a_tokenizer_vocab_size_is_checked_only_where_a_tokenizer_is_trained():
    synthetic = ["data.module=synthetic", "data.tokenizer_vocab_size=10"]
    assert load_config(None, synthetic, {}).data.tokenizer_vocab_size == 10
    char = load_config(None, ["data.tokenizer=char", "data.tokenizer_vocab_size=4"], {})
    assert char.data.tokenizer_vocab_size == 4


def test_a_key_written_twice_in_a_yaml_file_is_an_error(tmp_path):
    path = write(
        tmp_path, "model: {hidden_size: 64}\ntrain: {max_steps: 3}\nmodel: {num_layers: 3}\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"config file '.*run.yaml' line 3: duplicate key 'model' \(first on line 1\)",
    ):
        load_config(path, [], {})
    path = write(tmp_path, "model:\n  hidden_size: 64\n  num_layers: 2\n  hidden_size: 128\n")
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'model.hidden_size'"):
        load_config(path, [], {})
    merged = "base: &b {lr: 0.01}\noptim:\n  <<: *b\n  lr: 0.02\n"  # overriding a merge: fine
    assert read_yaml(write(tmp_path, merged))["optim"] == {"lr": 0.02}


def test_a_dotted_key_in_a_yaml_file_says_to_nest_it(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"config key 'optim.lr' in .*run.yaml is dotted, but YAML files nest keys: "
        r"write it nested: optim: \{lr: ...\}",
    ):
        load_config(write(tmp_path, "optim.lr: 0.001\n"), [], {})
    with pytest.raises(ConfigError, match=r"'optimm' in .*run.yaml \(did you mean 'optim'"):
        load_config(write(tmp_path, "optimm: {lr: 0.001}\n"), [], {})


def test_missing_and_malformed_yaml_never_fall_back_to_defaults(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        read_yaml(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections"):
        read_yaml(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(
        ConfigError, match=r"config section 'model' in .*run.yaml must be a mapping"
    ):
        load_config(write(tmp_path, "model: 3\n"), [], {})


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(
        None, ["model.num_layers=2", "optim.name=lion", "model.sliding_window=16"], {}
    )
    again = load_config(write(tmp_path, to_yaml(cfg)), [], {})
    assert again == cfg


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")):
        load_config(path, [], {})


def test_cli_prints_one_clear_error_and_exits_2(capsys):
    assert main(["optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    assert "Traceback" not in err


def test_cli_help_states_precedence():
    out = subprocess.run(
        [sys.executable, "-m", "llmfn.train", "--help"], capture_output=True, text=True, check=True
    )
    assert "defaults < CONFIG.yaml" in out.stdout and "LLMFN_SECTION__KEY" in out.stdout


@pytest.mark.parametrize("flag", ["--list-keys", "--help", "--print-config"])
def test_cli_output_into_a_closed_pipe_ends_quietly(flag):
    """`python -m llmfn.train --list-keys | head -3`: the reader leaves early; no traceback."""
    child = subprocess.Popen(
        [sys.executable, "-m", "llmfn.train", flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()  # before the child writes: its print meets a closed pipe
    stderr = child.stderr.read().decode()
    assert child.wait() == 0 and stderr == ""


def test_cli_help_config_errors_and_print_config_answer_without_importing_torch():
    """`llmfn` and `llmfn.data` load their exports on first use: torch and tensordict take
    seconds to import."""
    probe = (
        "import sys; from llmfn.train import main; "
        "codes = main(['--help']), main(['optim.lrr=1']), main(['--list-keys']), "
        "main(['data.tokenizer_vocab_size=3']), main(['--print-config']); "
        "print(codes, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "(0, 2, 0, 2, 0) False"
    assert "unknown config key 'optim.lrr'" in out.stderr
    assert "data.tokenizer_vocab_size=3 is invalid" in out.stderr


def test_the_package_exports_load_on_use_and_llmfn_generate_stays_the_function():
    probe = (
        "import llmfn, llmfn.generate, importlib; "
        "module = importlib.import_module('llmfn.generate'); "
        "from llmfn import generate, model; "
        "print(llmfn.generate is module.generate is generate, model.forward is llmfn.forward, "
        "sorted(llmfn.__all__) == sorted(llmfn._EXPORTS), 'forward' in dir(llmfn), "
        "llmfn.checkpoint.load_checkpoint.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    last = out.stdout.strip().splitlines()[-1]
    assert last == "True True True True llmfn.checkpoint.loading", out.stderr
    with pytest.raises(AttributeError, match="module 'llmfn' has no attribute 'forwrd'"):
        import llmfn

        llmfn.forwrd  # noqa: B018


def test_cli_missing_file_exits_nonzero_without_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "llmfn.train", "configs/does-not-exist.yaml"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "config file 'configs/does-not-exist.yaml' does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_yaml_path_with_an_equals_sign_is_a_path(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 2.0e-3\n")
    odd = path.with_name("tiny=x.yaml")
    path.rename(odd)
    config, _ = parse_args([str(odd), "train.max_steps=3"])
    assert config.optim.lr == 2e-3 and config.train.max_steps == 3


def test_print_config_shows_overrides(capsys):
    assert main(["optim.lr=0.005", "--print-config"]) == 0
    assert "lr: 0.005" in capsys.readouterr().out


def test_cli_prints_llmfn_warnings_on_one_line():
    import warnings

    import llmfn.trainer
    from llmfn.warning_format import one_line_warning

    ours = one_line_warning(
        "data/x holds no tokenizer.json", UserWarning, llmfn.trainer.__file__, 1
    )
    assert ours == "warning: data/x holds no tokenizer.json\n"
    theirs = one_line_warning("deprecated", UserWarning, warnings.__file__, 7)
    assert theirs.startswith(f"{warnings.__file__}:7: UserWarning: deprecated")


def test_the_clis_drop_torchs_cuda_home_notice_and_nothing_else(caplog):
    import logging

    from llmfn.warning_format import CUDA_HOME_NOTICE_LOGGER, use_one_line_warnings

    use_one_line_warnings()
    use_one_line_warnings()  # twice: still one filter
    logger = logging.getLogger(CUDA_HOME_NOTICE_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=CUDA_HOME_NOTICE_LOGGER):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for c++")
    assert [r.getMessage() for r in caplog.records] == ["Error checking compiler version for c++"]


def test_a_first_argument_named_like_a_key_is_an_override_missing_its_value(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'optim.lr' is not of the form"):
        parse_args(["optim.lr"])
    with pytest.raises(ConfigError, match=r"config file 'model.yml' does not exist"):
        parse_args(["model.yml"])  # a YAML name stays a file
    with pytest.raises(ConfigError, match=r"config file 'nothere' does not exist"):
        parse_args(["nothere"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.sample_prompt=the ", "sample_prompt", "the "),
        ("train.sample_prompt=Q: hi", "sample_prompt", "Q: hi"),
        ("train.sample_prompt=#include", "sample_prompt", "#include"),
        ("train.sample_prompt=[INST]", "sample_prompt", "[INST]"),
        ("train.sample_prompt={x}", "sample_prompt", "{x}"),
        ("train.sample_prompt=", "sample_prompt", ""),
        ("train.sample_prompt=null", "sample_prompt", "null"),  # None is no str
        ("train.run_name=2024", "run_name", "2024"),
        ("train.run_name=yes", "run_name", "yes"),
        ("train.run_name=None", "run_name", "None"),
        ("train.run_name=null", "run_name", None),
        ("train.run_name=~", "run_name", None),
    ],
)
def test_text_keys_take_the_value_as_written(override, key, expected):
    assert getattr(load_config(None, [override], {}).train, key) == expected
    dotted, text = override.split("=", 1)
    env = {"LLMFN_" + dotted.upper().replace(".", "__"): text}
    assert getattr(load_config(None, [], env).train, key) == expected


def test_non_text_keys_are_still_read_as_yaml():
    cfg = load_config(None, ["model.attention_bias=true", "train.deterministic=null"], {})
    assert cfg.model.attention_bias is True and cfg.train.deterministic is None


@pytest.mark.parametrize(
    "override",
    ["train.max_steps=1e30", "train.max_steps=9223372036854775808", "model.vocab_size=1e19"],
)
def test_int_keys_are_bounded_by_int64(override):
    key = override.split("=")[0]
    with pytest.raises(
        ConfigError, match=rf"^{key}=\d+ is invalid: expected an integer below 2\*\*63$"
    ):
        load_config(None, [override], {})
    assert (
        load_config(None, ["train.max_steps=9223372036854775807"], {}).train.max_steps == 2**63 - 1
    )


@pytest.mark.parametrize("text", ["optim: []\n", "train: 0\n", "train: false\n", "optim: ''\n"])
def test_a_section_that_is_not_a_mapping_is_an_error(tmp_path, text):
    section = text.split(":")[0]
    with pytest.raises(
        ConfigError,
        match=rf"config section '{section}' in .*run.yaml must be a mapping of keys to values",
    ):
        load_config(write(tmp_path, text), ["optim.lr=1e-3"], {})
    with pytest.raises(ConfigError, match=rf"config section '{section}' must be a mapping"):
        from_dict(read_yaml(write(tmp_path, text)))


def test_an_empty_section_keeps_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "optim:\ntrain: {}\n"), [], {}).optim.lr == 3e-4


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: 64\n num_layers: 2\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:3:2: not valid YAML: expected <block end>")
    with pytest.raises(ConfigError, match=r"run.yaml:2:1: not valid YAML: expected ',' or ']'"):
        read_yaml(write(tmp_path, "model: [unclosed\n"))


def test_a_config_file_after_an_override_says_it_must_come_first(tmp_path):
    for late in ["configs/tiny.yaml", "nothere.yml", str(tmp_path)]:
        with pytest.raises(
            ConfigError,
            match=rf"^'{late}' looks like a config file: the config file must come first",
        ):
            parse_args(["optim.lr=1", late])
    with pytest.raises(ConfigError, match=r"override 'optim.lr' is not of the form"):
        parse_args(["train.max_steps=3", "optim.lr"])
    with pytest.raises(
        ConfigError,
        match=r"^'configs/moe.yaml' looks like a second config file after 'configs/tiny.yaml': "
        "give one",
    ):
        parse_args(["configs/tiny.yaml", "configs/moe.yaml"])


def test_list_keys_prints_every_key_with_its_type_and_default(capsys):
    assert main(["--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = key_rows()
    assert len(lines) == len(rows) + 1 and lines[0].split() == ["key", "type", "default"]
    assert ("optim.lr", "float", "0.0003") in rows
    assert ("train.run_name", "str or null", "null") in rows
    assert any(line.split() == ["train.sample_prompt", "str", "''"] for line in lines)


def test_early_stopping_without_validation_data_is_an_error():
    with pytest.raises(
        ConfigError,
        match=r"train.early_stopping_patience=3 needs validation data, but data.val_fraction=0 "
        r"holds none out",
    ):
        load_config(None, ["data.val_fraction=0", "train.early_stopping_patience=3"], {})
    assert load_config(None, ["data.val_fraction=0"], {}).data.val_fraction == 0
    token_bin = ["data.module=token_bin", "data.path=bins", "data.val_fraction=0"]
    load_config(None, [*token_bin, "train.early_stopping_patience=3"], {})  # its own split
