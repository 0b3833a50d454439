"""Data modules: fixed shapes, targets = next token, resumable pure batches, disjoint ranks."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import llmfn.data.text_module as text_module
import llmfn.data.token_bin_module as token_bin_module
from llmfn.config import DataConfig
from llmfn.data import (
    DataModule,
    RegressionDataModule,
    StdlibDataModule,
    SyntheticDataModule,
    TextDataModule,
    TokenBinDataModule,
    build_data_module,
    prepare_bins,
    stdlib_files,
)
from llmfn.data.char_tokenizer import CharTokenizer
from llmfn.data.synthetic_module import BRANCHING

SEQ, BATCH = 32, 4


@pytest.fixture(scope="module")
def bin_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bins")
    (root / "text").mkdir()
    for i in range(6):
        (root / "text" / f"doc{i}.txt").write_text(
            "".join(f"line {i}.{j}: the {j % 7} quick foxes\n" for j in range(120))
        )
    prepare_bins(root / "text", root / "out", tokenizer="char", val_fraction=0.1, progress=False)
    return root / "out"


def ready(module, rank=0, world_size=1):
    module.prepare()
    module.setup(rank=rank, world_size=world_size)
    return module


def check_lm_batch(batch, batch_size=BATCH, seq_len=SEQ):
    assert set(batch) == {"inputs", "targets"}
    for value in batch.values():
        assert (
            value.shape == (batch_size, seq_len)
            and value.dtype == torch.long
            and value.is_contiguous()
        )
    assert torch.equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


# --- token bins -------------------------------------------------------------------------------
def test_token_bin_batches_are_windows_of_train_bin(bin_folder):
    data = ready(TokenBinDataModule(bin_folder, seq_len=SEQ, batch_size=BATCH, seed=1))
    assert isinstance(data, DataModule) and data.vocab_size == data.tokenizer.vocab_size
    train = np.fromfile(bin_folder / "train.bin", dtype=np.uint16)
    assert data.steps_per_epoch == (len(train) - SEQ) // (SEQ + 1) // BATCH
    for index in (0, 1, 57):
        batch = data.train_batch(index)
        check_lm_batch(batch)
        for row, start in enumerate(data.sampler.starts(index, 0)):
            window = train[start : start + SEQ + 1]
            assert batch["inputs"][row].tolist() == window[:-1].tolist()
            assert batch["targets"][row].tolist() == window[1:].tolist()


def test_resuming_needs_no_loader_state(bin_folder):
    first = ready(TokenBinDataModule(bin_folder, seq_len=SEQ, batch_size=BATCH, seed=5))
    uninterrupted = [first.train_batch(i) for i in range(12)]
    resumed = ready(TokenBinDataModule(bin_folder, seq_len=SEQ, batch_size=BATCH, seed=5))
    for i in (11, 7, 8):  # any order, any starting point
        assert all(
            torch.equal(resumed.train_batch(i)[k], uninterrupted[i][k])
            for k in ("inputs", "targets")
        )
    other_seed = ready(TokenBinDataModule(bin_folder, seq_len=SEQ, batch_size=BATCH, seed=6))
    assert not torch.equal(other_seed.train_batch(3)["inputs"], uninterrupted[3]["inputs"])


def test_ranks_get_disjoint_windows_in_a_step(bin_folder):
    ranks = [
        ready(TokenBinDataModule(bin_folder, seq_len=SEQ, batch_size=BATCH, seed=0), r, 2)
        for r in range(2)
    ]
    for step in range(20):
        starts = np.sort(np.concatenate([m.sampler.starts(step, m.rank) for m in ranks]))
        assert (np.diff(starts) > SEQ).all()  # windows of SEQ + 1 tokens never overlap
        a, b = (m.train_batch(step)["inputs"] for m in ranks)
        assert not any(torch.equal(x, y) for x in a for y in b)
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch


def test_val_batches_are_fixed(bin_folder):
    data = ready(TokenBinDataModule(bin_folder, seq_len=SEQ, batch_size=BATCH, val_batches=3))
    first, second = list(data.val_batches()), list(data.val_batches())
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        check_lm_batch(a)
        assert torch.equal(a["inputs"], b["inputs"])
    rank1 = ready(
        TokenBinDataModule(bin_folder, seq_len=SEQ, batch_size=BATCH, val_batches=3), 1, 2
    )
    assert torch.equal(next(rank1.val_batches())["inputs"], first[0]["inputs"])  # rank-independent


def test_token_bin_errors(tmp_path, bin_folder):
    with pytest.raises(FileNotFoundError, match="does not exist.*llmfn.data.prepare"):
        TokenBinDataModule(tmp_path / "nope", seq_len=SEQ, batch_size=BATCH).prepare()
    with pytest.raises(RuntimeError, match="call setup"):
        TokenBinDataModule(bin_folder, seq_len=SEQ, batch_size=BATCH).train_batch(0)
    with pytest.raises(ValueError, match="train.bin: only .* tokens: fewer than one window"):
        ready(TokenBinDataModule(bin_folder, seq_len=100_000, batch_size=BATCH))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "val.bin", "tokenizer.json"):
        (broken / name).write_bytes((bin_folder / name).read_bytes())
    (broken / "train.bin").write_bytes((bin_folder / "train.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="meta.json promises .* corrupt"):
        ready(TokenBinDataModule(broken, seq_len=SEQ, batch_size=BATCH))


def test_a_text_file_as_token_bin_folder_suggests_the_text_module(tmp_path):
    (tmp_path / "book.txt").write_text("some text\n")
    with pytest.raises(NotADirectoryError, match=r"'.*book.txt' is a file: .*data.module=text"):
        TokenBinDataModule(tmp_path / "book.txt", seq_len=SEQ, batch_size=BATCH).prepare()


def test_short_train_bin_epochs_pass_over_the_tokens_once(tmp_path):
    """Too few tokens for a batch of non-overlapping windows: the overlapping windows that
    stand in for them do not make an epoch one pass per window."""
    (tmp_path / "t.txt").write_text("the quick brown fox jumps\n" * 40)  # ~1000 tokens
    prepare_bins(tmp_path / "t.txt", tmp_path / "out", tokenizer="char", val_fraction=0, progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="no validation batches"):
        data = ready(TokenBinDataModule(tmp_path / "out", seq_len=300, batch_size=BATCH))
    assert data.sampler.stride == 1
    tokens_per_step = BATCH * (300 + 1)
    assert (data.steps_per_epoch - 1) * tokens_per_step < len(data.bins.train)


def copy_bins(source: Path, target: Path, meta=None, skip=()) -> Path:
    """A copy of a token-bin folder, with meta.json replaced by `meta` if given."""
    target.mkdir()
    for path in source.iterdir():
        if path.name not in skip:
            (target / path.name).write_bytes(path.read_bytes())
    if meta is not None:
        (target / "meta.json").write_text(json.dumps(meta))
    return target


def test_bad_meta_json_names_the_file_and_field(tmp_path, bin_folder):
    meta = json.loads((bin_folder / "meta.json").read_text())
    for number, (bad, message) in enumerate([
        ([meta], "meta.json: expected a JSON object, got list"),
        ({k: v for k, v in meta.items() if k != "train_tokens"}, "meta.json: 'train_tokens' is missing: expected a whole number >= 0"),
        ({**meta, "train_tokens": "lots"}, "meta.json: 'train_tokens' is 'lots': expected a whole number >= 0"),
        ({**meta, "val_tokens": -1}, "'val_tokens' is -1"),
        ({**meta, "dtype": "float32"}, "'dtype' is 'float32': expected uint16 or uint32"),
        ({**meta, "tokenizer": "char"}, "'tokenizer' is 'char': expected an object"),
        ({**meta, "tokenizer": {"file": "tokenizer.json"}}, "'tokenizer.vocab_size' is missing"),
        ({**meta, "tokenizer": {**meta["tokenizer"], "file": 3}}, "'tokenizer.file' is 3"),
    ]):  # fmt: skip
        folder = copy_bins(bin_folder, tmp_path / str(number), meta=bad)
        with pytest.raises(ValueError, match=re.escape(message)):
            ready(TokenBinDataModule(folder, seq_len=SEQ, batch_size=BATCH))


def test_token_ids_beyond_the_vocabulary_name_the_bin_and_id(tmp_path, bin_folder, monkeypatch):
    folder = copy_bins(bin_folder, tmp_path / "bad")
    train = np.fromfile(folder / "train.bin", dtype=np.uint16)
    vocab = json.loads((folder / "meta.json").read_text())["tokenizer"]["vocab_size"]
    train[1234] = 60_000
    train.tofile(folder / "train.bin")
    message = f"train.bin: token id 60000 at position 1,234 is >= the vocabulary size {vocab}"
    with pytest.raises(ValueError, match=message):
        ready(TokenBinDataModule(folder, seq_len=SEQ, batch_size=BATCH))
    monkeypatch.setattr(token_bin_module, "SCAN_TOKENS", 0)  # bins too large to scan at setup
    data = ready(TokenBinDataModule(folder, seq_len=SEQ, batch_size=BATCH))
    with pytest.raises(ValueError, match=message):  # then the batch holding it fails
        for index in range(data.steps_per_epoch):
            data.train_batch(index)


def test_missing_tokenizer_is_a_warning(tmp_path, bin_folder):
    folder = copy_bins(bin_folder, tmp_path / "bare", skip=("tokenizer.json",))
    with pytest.warns(UserWarning, match="holds no tokenizer.json: training works"):
        data = ready(TokenBinDataModule(folder, seq_len=SEQ, batch_size=BATCH))
    assert data.tokenizer is None and data.vocab_size > 0
    check_lm_batch(data.train_batch(0))


def test_the_tokenizer_file_must_be_a_name_inside_the_folder(tmp_path, bin_folder):
    meta = json.loads((bin_folder / "meta.json").read_text())
    outside = copy_bins(bin_folder, tmp_path / "outside")  # a valid tokenizer, elsewhere
    for number, file in enumerate(["../outside/tokenizer.json", str(outside / "tokenizer.json")]):
        bad = {**meta, "tokenizer": {**meta["tokenizer"], "file": file}}
        folder = copy_bins(bin_folder, tmp_path / str(number), meta=bad)
        message = f"meta.json: 'tokenizer.file' is {file!r}: expected a file name in the folder"
        with pytest.raises(ValueError, match=re.escape(message)):
            ready(TokenBinDataModule(folder, seq_len=SEQ, batch_size=BATCH))


def test_a_tokenizer_of_another_vocabulary_is_an_error(tmp_path, bin_folder):
    folder = copy_bins(bin_folder, tmp_path / "mixed")
    vocab = json.loads((folder / "meta.json").read_text())["tokenizer"]["vocab_size"]
    CharTokenizer(["a", "b"]).save(folder)  # 5 ids: not the tokenizer the bins were made with
    message = (
        f"{folder / 'tokenizer.json'}: the tokenizer has 5 ids, but {folder / 'meta.json'}'s "
        f"tokenizer.vocab_size is {vocab}: it is not the tokenizer the bins were made with"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ready(TokenBinDataModule(folder, seq_len=SEQ, batch_size=BATCH))


def test_a_text_module_with_a_malformed_tokenizer_names_the_file(tmp_path):
    (tmp_path / "t.txt").write_text("some text\n" * 100)
    (tmp_path / "tk").mkdir()
    (tmp_path / "tk" / "tokenizer.json").write_text('{"type": "llmfn-char", "chars": ["a"], "specials": 5}')  # fmt: skip
    data = TextDataModule(tmp_path / "t.txt", seq_len=SEQ, batch_size=BATCH, tokenizer=str(tmp_path / "tk"),
                          cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tk' / 'tokenizer.json'}: 'specials' is 5")):  # fmt: skip
        data.prepare()


def test_a_text_module_with_no_training_tokens_names_the_config_key(tmp_path):
    (tmp_path / "t.txt").write_text("x\n")
    data = TextDataModule(tmp_path / "t.txt", seq_len=SEQ, batch_size=BATCH, tokenizer="char",
                          cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"^data.val_fraction=0.05 leaves nothing to train on: .* lower data.val_fraction \(0"):  # fmt: skip
        data.prepare()
    assert not data.path.exists()


def test_no_val_split_gives_no_val_batches(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefgh\n" * 200)
    prepare_bins(
        tmp_path / "t.txt", tmp_path / "out", tokenizer="char", val_fraction=0, progress=False
    )
    with pytest.warns(UserWarning, match="no validation batches"):
        data = ready(TokenBinDataModule(tmp_path / "out", seq_len=SEQ, batch_size=BATCH))
    assert list(data.val_batches()) == []


# --- text and stdlib --------------------------------------------------------------------------
def test_text_module_prepares_once_into_the_cache(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"document {i}\n" * 300)
    options = dict(
        seq_len=SEQ,
        batch_size=BATCH,
        tokenizer="char",
        cache_dir=tmp_path / "cache",
        val_fraction=0.1,
    )
    data = TextDataModule(corpus, **options)
    with pytest.raises(FileNotFoundError, match="call prepare"):
        data.setup(rank=0, world_size=1)
    ready(data)
    assert data.path.parent == tmp_path / "cache" and data.path.name.startswith("text-corpus-char-")
    meta = data.path / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again = ready(TextDataModule(corpus, **options))
    assert again.path == data.path and meta.stat().st_mtime_ns == stamp  # reused, not rebuilt
    check_lm_batch(again.train_batch(0))
    assert "document" in again.tokenizer.decode(again.train_batch(0)["inputs"][0].tolist())
    monkeypatch.setattr(text_module, "BINS_REVISION", text_module.BINS_REVISION + 1)
    assert TextDataModule(corpus, **options).path != data.path  # bins made otherwise: a new cache
    monkeypatch.undo()
    (corpus / "0.txt").write_text("changed\n" * 400)
    assert TextDataModule(corpus, **options).path != data.path  # a changed file, a new cache


def test_a_cache_dir_the_inputs_would_read_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n" * 100)
    options = {"seq_len": SEQ, "batch_size": BATCH, "tokenizer": "char", "progress": False}
    for inputs in (corpus, str(corpus / "**")):
        with pytest.raises(ValueError, match=r"data.cache_dir '.*cache' is (inside|matched by)"):
            TextDataModule(inputs, cache_dir=corpus / "cache", **options)
    assert not (corpus / "cache").exists()
    data = ready(TextDataModule(corpus, cache_dir=corpus / ".cache", **options))  # hidden: unread
    assert TextDataModule(corpus, cache_dir=corpus / ".cache", **options).path == data.path


def test_text_module_decoding_errors_name_the_config_key(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text\n" * 10 + b"bad \xff byte\n")
    data = TextDataModule(tmp_path / "bad.txt", seq_len=SEQ, batch_size=BATCH, tokenizer="char",
                          cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"invalid UTF-8 .* use data.errors=replace .* or data.errors=ignore"):  # fmt: skip
        data.prepare()


@pytest.mark.parametrize(
    ("fraction", "message"),
    [(0, "data.val_fraction=0 holds out no text"),
     (0.001, r"data.val_fraction=0.001 holds out \d+ tokens, fewer than one window of 33 .*\(raise data.val_fraction\)")],
)  # fmt: skip
def test_text_module_without_val_batches_names_the_config_key(tmp_path, fraction, message):
    (tmp_path / "t.txt").write_text("abcdefgh\n" * 200)
    with pytest.warns(UserWarning, match=f"^{message}"):
        data = ready(TextDataModule(tmp_path / "t.txt", seq_len=SEQ, batch_size=BATCH, tokenizer="char",
                                    val_fraction=fraction, cache_dir=tmp_path, progress=False))  # fmt: skip
    assert list(data.val_batches()) == []


def test_stdlib_files_are_a_deterministic_subset():
    files = stdlib_files(max_files=None)
    assert files == stdlib_files(max_files=None) and len(files) > 100
    names = {part for path in files for part in path.parts}
    assert not names & {"site-packages", "test", "tests", "__pycache__", "encodings"}
    assert all(path.suffix == ".py" for path in files)
    subset = stdlib_files(max_files=10)
    assert (
        len(subset) == 10
        and set(subset) <= set(files)
        and subset == sorted(subset, key=files.index)
    )
    assert subset[0] == files[0] and subset[-1] == files[-1]  # spread over the whole library


def test_stdlib_module_trains_on_python_source(tmp_path):
    data = ready(
        StdlibDataModule(
            max_files=6,
            tokenizer="char",
            cache_dir=tmp_path,
            seq_len=SEQ,
            batch_size=BATCH,
            progress=False,
        )
    )
    assert data.path.name.startswith("stdlib-char-")
    check_lm_batch(data.train_batch(0))
    text = data.tokenizer.decode(data.bins.train[:20_000].tolist())
    assert "def " in text and "import " in text


# --- synthetic --------------------------------------------------------------------------------
def test_synthetic_tokens_follow_a_learnable_chain():
    data = ready(
        SyntheticDataModule(vocab_size=50, seq_len=SEQ, batch_size=BATCH, size=256, seed=3)
    )
    batch = data.train_batch(0)
    check_lm_batch(batch)
    assert batch["inputs"].max() < 50 and data.vocab_size == 50 and data.tokenizer is None
    successors: dict[int, set[int]] = {}
    for tokens in data.train["tokens"]:
        for a, b in zip(tokens[:-1], tokens[1:], strict=True):
            successors.setdefault(int(a), set()).add(int(b))
    assert max(len(s) for s in successors.values()) <= BRANCHING  # entropy floor ln(4)
    assert torch.equal(batch["inputs"], ready(SyntheticDataModule(vocab_size=50, seq_len=SEQ, batch_size=BATCH, size=256, seed=3)).train_batch(0)["inputs"])  # fmt: skip
    assert len(list(data.val_batches())) == 3  # 5% of 256 = 13 held out -> 3 full batches


def test_regression_data_is_a_smooth_function_plus_noise():
    data = ready(RegressionDataModule(features=5, batch_size=16, size=2000, seed=0))
    batch = data.train_batch(4)
    assert (
        batch["x"].shape == (16, 5)
        and batch["y"].shape == (16, 1)
        and batch["x"].dtype == torch.float32
    )
    x, y, clean = data.train["x"], data.train["y"], data.train["clean"]
    assert 0.008 < np.mean((y - clean) ** 2) < 0.012  # the noise floor: MSE 0.01
    assert 0.8 < np.var(clean) < 1.2
    _, residual, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)
    assert residual[0] / len(x) > 0.05  # not linear: a model has something to learn
    assert data.vocab_size is None and data.steps_per_epoch == (2000 - 100) // 16
    again = ready(RegressionDataModule(features=5, batch_size=16, size=2000, seed=0)).train_batch(4)
    assert torch.equal(again["y"], batch["y"])
    for val in data.val_batches():
        assert val["x"].shape == (16, 5)


def test_synthetic_too_small_is_a_clear_error():
    needs = r"synthetic_size=10 is too small: needs at least 16 examples \(a training batch of data.batch_size=8"
    with pytest.raises(ValueError, match=needs):
        SyntheticDataModule(vocab_size=10, seq_len=8, batch_size=8, size=10)
    SyntheticDataModule(vocab_size=10, seq_len=8, batch_size=8, size=16)  # the minimum is enough


# --- build from config ------------------------------------------------------------------------
def test_build_data_module_from_config(tmp_path, bin_folder):
    built = build_data_module(
        DataConfig(module="token_bin", path=str(bin_folder), batch_size=2), seq_len=16, seed=0
    )
    check_lm_batch(ready(built).train_batch(0), batch_size=2, seq_len=16)
    synthetic = build_data_module(
        DataConfig(module="synthetic", synthetic_vocab_size=17), seq_len=8, seed=0
    )
    assert isinstance(synthetic, SyntheticDataModule) and synthetic.vocab_size == 17
    regression = build_data_module(
        DataConfig(module="regression", regression_features=3), seq_len=8, seed=0
    )
    assert ready(regression).train_batch(0)["x"].shape == (8, 3)
    stdlib = build_data_module(
        DataConfig(module="stdlib", cache_dir=str(tmp_path), tokenizer="char"), seq_len=8, seed=0
    )
    assert isinstance(stdlib, StdlibDataModule) and len(stdlib.files) == 256
    text = build_data_module(
        DataConfig(module="text", path=str(bin_folder.parent / "text" / "doc*.txt"), max_files=2),
        seq_len=8,
        seed=0,
    )
    assert isinstance(text, TextDataModule) and [f.name for f in text.files] == [
        "doc0.txt",
        "doc5.txt",
    ]
    with pytest.raises(ValueError, match="needs data.path"):
        build_data_module(DataConfig(module="sft"), seq_len=8, seed=0)
    with pytest.raises(ValueError, match="data.module='nope'"):
        build_data_module(DataConfig(module="nope"), seq_len=8, seed=0)
    assert json.loads((bin_folder / "meta.json").read_text())["format"] == "llmfn-token-bin"
    for module in (built, synthetic, regression, stdlib, text):
        assert isinstance(module, DataModule)  # the attributes and methods the trainer uses
