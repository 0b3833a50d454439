"""The prepare CLI: text files -> train.bin / val.bin / meta.json, streaming and atomic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llmfn.data.binarize as prepare_module
import llmfn.data.sources as sources
from llmfn.data import load_tokenizer
from llmfn.data.atomic import OutputError, atomic_folder
from llmfn.data.binarize import SplitLayout, choose_dtype, prepare_bins
from llmfn.data.char_tokenizer import CharTokenizer
from llmfn.data.prepare import main
from llmfn.data.sources import InputError, read_segments, resolve_inputs

TEXTS = {
    "a.txt": "Hello world.\nThe quick brown fox jumps over the lazy dog.\n" * 30,
    "sub/b.py": "def f(x):\n    return x * 2  # ünïcödé ✓\n" * 40,
    "sub/c.md": "# Title\n\nSome *markdown* text, 🎉 emoji and CJK 中文.\n" * 25,
}


def write_corpus(root: Path, texts: dict[str, str] = TEXTS) -> Path:
    for name, text in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root


def bins(folder: Path) -> dict[str, np.ndarray]:
    meta = json.loads((folder / "meta.json").read_text())
    return {
        split: np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])
        for split in ("train", "val")
    }


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- end to end -------------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_round_trip_without_val_split(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus")
    code = main(["--input", str(corpus), "--tokenizer", tokenizer, "--out", str(tmp_path / "out"),
                 "--val-fraction", "0", "--vocab-size", "300", "--no-progress"])  # fmt: skip
    assert code == 0
    out = tmp_path / "out"
    assert {"meta.json", "tokenizer.json", "train.bin", "val.bin"} <= {
        p.name for p in out.iterdir()
    }
    tok = load_tokenizer(out)
    ids = bins(out)["train"]
    files = resolve_inputs(corpus)
    assert [f.relative_to(corpus).as_posix() for f in files] == ["a.txt", "sub/b.py", "sub/c.md"]
    assert tok.decode(ids.tolist()) == "".join(f.read_text(encoding="utf-8") for f in files)
    assert (ids == tok.eos_id).sum() == 3  # one separator after each document
    meta = json.loads((out / "meta.json").read_text())
    assert (
        meta["dtype"] == "uint16" and meta["train_tokens"] == len(ids) and meta["val_tokens"] == 0
    )
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size and meta["documents"] == 3
    import hashlib

    assert [s["sha256"] for s in meta["sources"]] == [
        hashlib.sha256(f.read_bytes()).hexdigest() for f in files
    ]


def test_val_split_takes_the_fraction_spread_over_the_corpus(tmp_path):
    corpus = write_corpus(
        tmp_path / "corpus",
        {f"doc{i:02d}.txt": f"line {i} of the corpus\n" * 200 for i in range(20)},
    )
    full = prepare_bins(corpus, tmp_path / "full", tokenizer="char", val_fraction=0, progress=False)
    meta = prepare_bins(
        corpus, tmp_path / "split", tokenizer="char", val_fraction=0.1, progress=False
    )
    total = full["train_tokens"]
    assert meta["train_tokens"] + meta["val_tokens"] == total
    assert 0.07 < meta["val_tokens"] / total < 0.13
    tok = load_tokenizer(tmp_path / "split")
    val_text = tok.decode(bins(tmp_path / "split")["val"].tolist())
    represented = {i for i in range(20) if f"line {i} of" in val_text}
    assert len(represented) >= 10  # blocks from all over the corpus, not only its tail


@pytest.mark.slow  # a fresh interpreter importing torch: 10-30 s on a busy 2-core machine
def test_cli_module_entry_point_and_progress(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    result = subprocess.run(
        [sys.executable, "-m", "llmfn.data.prepare", "--input", str(corpus / "*.txt"), str(corpus / "sub"),
         "--tokenizer", "char", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tokenizing" in result.stderr and "100%" in result.stderr  # the progress bar
    assert "from 3 file(s)" in result.stdout


def test_existing_tokenizer_file_gives_the_same_ids(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    prepare_bins(
        corpus, tmp_path / "first", tokenizer="bpe", vocab_size=300, val_fraction=0, progress=False
    )
    prepare_bins(corpus, tmp_path / "again", tokenizer=str(tmp_path / "first" / "tokenizer.json"), val_fraction=0, progress=False)  # fmt: skip
    assert np.array_equal(bins(tmp_path / "first")["train"], bins(tmp_path / "again")["train"])
    meta = json.loads((tmp_path / "again" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "hf" and (tmp_path / "again" / "tokenizer.json").is_file()


def test_tiny_buffers_give_identical_output(tmp_path, monkeypatch):
    """Chunk and segment borders (mid-line, mid-UTF-8 character) do not change the tokens."""
    corpus = write_corpus(tmp_path / "corpus")
    prepare_bins(corpus, tmp_path / "big", tokenizer="char", val_fraction=0, progress=False)
    monkeypatch.setattr(sources, "READ_BYTES", 7)
    monkeypatch.setattr(sources, "SNAP_CHARS", 4)
    monkeypatch.setattr(prepare_module, "ENCODE_BATCH_CHARS", 50)
    monkeypatch.setattr(prepare_module, "SEGMENT_CHARS", 16)
    prepare_bins(corpus, tmp_path / "small", tokenizer="char", val_fraction=0, progress=False)
    assert np.array_equal(bins(tmp_path / "big")["train"], bins(tmp_path / "small")["train"])


def long_lines(count: int, words: int, seed: int = 0) -> str:
    """`count` lines of `words` random words each (no newline inside a line)."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array(["the", "model", "trains", "on", "tokens", "while", "a", "bin",
                           "holds", "their", "ids", "fast", "ünïcödé", "中文", "42,", "x."])  # fmt: skip
    return "".join(" ".join(rng.choice(vocabulary, words)) + "\n" for _ in range(count))


def is_subsequence(part: np.ndarray, whole: np.ndarray) -> bool:
    found = iter(whole.tolist())
    return all(token in found for token in part.tolist())


def test_a_val_split_keeps_the_tokens_of_encoding_the_text_whole(tmp_path):
    """Split borders land at word borders: the bins hold the ids of encoding the file whole,
    split into train and val, and the learned vocabulary does not depend on val_fraction."""
    (tmp_path / "lines.txt").write_text(long_lines(count=30, words=400), encoding="utf-8")
    options = {"tokenizer": "bpe", "vocab_size": 400, "progress": False}
    meta = prepare_bins(tmp_path / "lines.txt", tmp_path / "split", val_fraction=0.05, **options)
    prepare_bins(tmp_path / "lines.txt", tmp_path / "whole", val_fraction=0, **options)
    assert 0 < meta["val_block_chars"] < 400  # blocks far shorter than a line
    learned = [(tmp_path / out / "tokenizer.json").read_text() for out in ("split", "whole")]
    assert learned[0] == learned[1]
    tok = load_tokenizer(tmp_path / "split")
    whole = np.array(
        tok.encode((tmp_path / "lines.txt").read_text(encoding="utf-8")) + [tok.eos_id]
    )
    split = bins(tmp_path / "split")
    assert 0.03 < len(split["val"]) / len(whole) < 0.07
    assert is_subsequence(split["train"], whole) and is_subsequence(split["val"], whole)
    counts = np.bincount(np.concatenate([split["train"], split["val"]]), minlength=tok.vocab_size)
    assert np.array_equal(counts, np.bincount(whole, minlength=tok.vocab_size))


def test_segments_are_cut_at_word_borders_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SNAP_CHARS", 8)
    path = tmp_path / "x.txt"
    path.write_text("short line\n" + "y" * 50 + "\nthen a few words and\nlines\n end")
    text = path.read_text()
    segments = list(read_segments([path], segment_chars=16))
    assert "".join(s.text for s in segments) == text
    assert all(len(s.text) <= 16 + 8 for s in segments) and segments[-1].ends_document
    offsets = np.cumsum([0] + [len(s.text) for s in segments[:-1]])
    assert [s.offset for s in segments] == offsets.tolist()
    for cut in offsets[1:]:  # before a space after a word, or after a newline between lines
        at_word = text[cut] == " " and not text[cut - 1].isspace()
        at_line = text[cut - 1] == "\n" and not text[cut - 2].isspace() and not text[cut].isspace()
        assert at_word or at_line or text[cut - 1 : cut + 1] == "yy", (cut, text[cut - 3 : cut + 3])


def test_segments_stop_at_split_borders(tmp_path, monkeypatch):
    """No segment reaches more than SNAP_CHARS past a train/val border, so its start offset
    tells its split."""
    monkeypatch.setattr(sources, "SNAP_CHARS", 8)
    path = tmp_path / "x.txt"
    path.write_text(long_lines(count=3, words=100), encoding="utf-8")
    layout = SplitLayout(block=40, period=200)
    segments = list(read_segments([path], segment_chars=1000, next_split=layout.next_split))
    assert "".join(s.text for s in segments) == path.read_text(encoding="utf-8")
    for segment in segments:
        border = layout.next_split(segment.offset)
        assert segment.offset + len(segment.text) <= border + 8  # a cut moved to a word border
    val = [s for s in segments if layout.is_val(s.offset)]
    assert abs(sum(len(s.text) for s in val) - 40 * len(val)) < 8 * len(val)


# --- errors -----------------------------------------------------------------------------------
def run_cli(tmp_path, *args) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*args, "--no-progress"])
    return code, err.getvalue()


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, err = run_cli(
        tmp_path, "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")
    )
    assert code == 2 and "input is empty" in err
    code, err = run_cli(
        tmp_path, "--input", str(tmp_path / "*.nothing"), "--out", str(tmp_path / "out")
    )
    assert code == 2 and "matches no files" in err
    code, err = run_cli(
        tmp_path, "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")
    )
    assert code == 2 and "missing.txt' does not exist" in err
    assert not (tmp_path / "out").exists()


def test_undecodable_bytes_error_names_the_file_or_are_replaced(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "bad.txt").write_bytes(b"good text\n" * 10 + b"bad \xff\xfe byte\n")
    code, err = run_cli(
        tmp_path, "--input", str(corpus), "--tokenizer", "char", "--out", str(tmp_path / "out")
    )
    assert code == 2 and "bad.txt: invalid UTF-8 near byte 104" in err and "--errors replace" in err
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)  # nothing half-written
    code, _ = run_cli(tmp_path, "--input", str(corpus / "bad.txt"), "--tokenizer", "char",
                      "--out", str(tmp_path / "out"), "--errors", "replace", "--val-fraction", "0")  # fmt: skip
    assert code == 0
    text = load_tokenizer(tmp_path / "out").decode(bins(tmp_path / "out")["train"].tolist())
    assert text.endswith("bad \ufffd\ufffd byte\n")


def test_existing_output_needs_overwrite(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["--input", str(corpus), "--tokenizer", "char", "--out", str(out), "--val-fraction", "0"]
    assert run_cli(tmp_path, *args)[0] == 0
    (corpus / "a.txt").write_text("changed\n")
    code, err = run_cli(tmp_path, *args)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert run_cli(tmp_path, *args, "--overwrite")[0] == 0
    assert "changed" in load_tokenizer(out).decode(bins(out)["train"].tolist())
    assert no_leftovers(tmp_path)


def test_overwrite_replaces_only_a_prepared_folder(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.md").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    before = snapshot(tmp_path)
    for out, what in [
        ("notes", "holds notes.md, not a prepared dataset"),
        ("file.txt", "is a file"),
    ]:
        args = ["--input", str(corpus), "--tokenizer", "char", "--out", str(tmp_path / out)]
        code, err = run_cli(tmp_path, *args, "--overwrite")
        assert (
            code == 2 and f"--out '{tmp_path / out}' {what}" in err and "written by prepare" in err
        )
    assert snapshot(tmp_path) == before and no_leftovers(tmp_path)
    (tmp_path / "empty").mkdir()
    args = ["--input", str(corpus), "--tokenizer", "char", "--out", str(tmp_path / "empty")]
    assert run_cli(tmp_path, *args, "--overwrite")[0] == 0


def test_an_unwritable_output_names_the_out_path(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "file.txt").write_text("mine")
    out = tmp_path / "file.txt" / "out"
    code, err = run_cli(tmp_path, "--input", str(corpus), "--tokenizer", "char", "--out", str(out))
    assert code == 2 and f"--out '{out}' is inside '{out.parent}', which is a file" in err

    def no_space(self, directory):
        raise OSError(28, "No space left on device", str(Path(directory) / "tokenizer.json"))

    monkeypatch.setattr(CharTokenizer, "save", no_space)
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, "--input", str(corpus), "--tokenizer", "char", "--out", str(out))
    assert code == 2 and err == f"error: --out '{out}' cannot be written: No space left on device\n"
    assert not out.exists() and no_leftovers(tmp_path)


def test_the_current_folder_or_an_empty_out_is_refused(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out, message in [("", "--out is empty"), (".", "--out '.' is the current folder"),
                         ("..", "--out '..' is the current folder or one above it")]:  # fmt: skip
        code, err = run_cli(tmp_path, "--input", str(corpus), "--out", out, "--overwrite")
        assert code == 2 and message in err
    assert not list((tmp_path / "here").iterdir()) and no_leftovers(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokenizer", "char", "--vocab-size", "0"],
         "--vocab-size 0 is too small for --tokenizer char: expected at least 4 (3 special tokens + 1 character)"),
        (["--tokenizer", "bpe", "--vocab-size", "10"],
         "--vocab-size 10 is too small for --tokenizer bpe: expected at least 258 (256 bytes + 2 special tokens)"),
        (["--tokenizer", "char", "--max-tokenizer-chars", "0"],
         "--max-tokenizer-chars 0 is invalid: expected a number >= 1"),
        (["--tokenizer", "char", "--val-fraction", "1"],
         "--val-fraction 1.0 is invalid: expected a number in [0, 1)"),
    ],
)  # fmt: skip
def test_flag_values_are_checked_before_any_work(tmp_path, args, message):
    corpus = write_corpus(tmp_path / "corpus")
    code, err = run_cli(tmp_path, "--input", str(corpus), "--out", str(tmp_path / "out"), *args)
    assert code == 2 and err == f"error: {message}\n"


def test_many_unknown_tokens_are_warned_about(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    kwargs = {"tokenizer": "char", "val_fraction": 0, "progress": False, "if_exists": "replace"}
    with pytest.warns(
        UserWarning,
        match=r"of the tokens .* are the unknown token <UNK>: raise --vocab-size \(now 6",
    ):
        prepare_bins(corpus, tmp_path / "out", vocab_size=6, **kwargs)
    with pytest.warns(UserWarning, match=r"<UNK>: raise --max-tokenizer-chars \(now 50\)"):
        prepare_bins(corpus, tmp_path / "out", max_tokenizer_chars=50, **kwargs)  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_output_that_is_or_holds_the_input_is_refused_untouched(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    before = snapshot(tmp_path)
    held = f"holds the input files ({corpus / 'a.txt'} and 2 more)"
    for inputs, out, message in [
        ([corpus], corpus, f"--out '{corpus}' {held}"),  # the folder itself
        ([corpus / "sub"], tmp_path, f"--out '{tmp_path}' holds the input files"),  # a parent
        ([corpus / "a.txt"], corpus / "a.txt", "is the input file"),  # the file itself
    ]:
        args = ["--input", *map(str, inputs), "--out", str(out), "--tokenizer", "char"]
        code, err = run_cli(tmp_path, *args, "--overwrite")
        assert code == 2 and message in err and "choose another folder" in err, err
        assert snapshot(tmp_path) == before and no_leftovers(tmp_path) and no_leftovers(corpus)


def test_output_where_the_inputs_are_read_is_refused(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    for spec, out in [(corpus, corpus / "bins"), (corpus / "**", corpus / "sub" / "bins"),
                      (corpus / "*" / "*", corpus / "bins")]:  # fmt: skip
        with pytest.raises(ValueError, match="a later run would read the output as input"):
            prepare_bins(str(spec), out, tokenizer="char", progress=False)
        assert not out.exists()
    for spec, out in [(corpus, corpus / ".bins"), (corpus / "**" / "*.py", corpus / "bins")]:
        prepare_bins(str(spec), out, tokenizer="char", val_fraction=0, progress=False)
        assert (out / "meta.json").is_file()


def test_vocabulary_beyond_uint16_switches_to_uint32(tmp_path):
    alphabet = "".join(chr(0x20000 + i) for i in range(70_000))  # 70k distinct characters
    (tmp_path / "wide.txt").write_text(alphabet, encoding="utf-8")
    meta = prepare_bins(tmp_path / "wide.txt", tmp_path / "out", tokenizer="char", vocab_size=80_000,
                        val_fraction=0, progress=False)  # fmt: skip
    assert meta["tokenizer"]["vocab_size"] == 70_003 and meta["dtype"] == "uint32"
    ids = bins(tmp_path / "out")["train"]
    assert ids.max() >= 65_536 and load_tokenizer(tmp_path / "out").decode(ids.tolist()) == alphabet
    with pytest.raises(ValueError, match="70003 ids does not fit --dtype uint16"):
        prepare_bins(tmp_path / "wide.txt", tmp_path / "out16", tokenizer="char", vocab_size=80_000, dtype="uint16", progress=False)  # fmt: skip
    assert not (tmp_path / "out16").exists()


def test_choose_dtype():
    assert choose_dtype(65_536) == np.uint16 and choose_dtype(65_537) == np.uint32
    assert choose_dtype(100, "uint32") == np.uint32


def test_split_layout_fraction():
    layout = SplitLayout.for_corpus(10_000_000, 0.01)
    held = sum(layout.is_val(offset) for offset in range(0, 10_000_000, 97))
    assert abs(held / len(range(0, 10_000_000, 97)) - 0.01) < 0.002
    assert not any(SplitLayout.for_corpus(1000, 0).is_val(o) for o in range(1000))
    with pytest.raises(ValueError, match="val_fraction=1"):
        SplitLayout.for_corpus(1000, 1)


# --- atomic folders ---------------------------------------------------------------------------
def test_a_failure_inside_leaves_no_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "train.bin").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_a_failed_swap_keeps_the_old_folder_and_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meta.json").write_text("old")
    rename = os.rename

    def busy_tmp(source, target):
        if ".out.tmp-" in str(source):
            raise OSError(16, "Device or resource busy", str(source))
        rename(source, target)

    monkeypatch.setattr(os, "rename", busy_tmp)
    busy = pytest.raises(OutputError, match="out' cannot be written: Device or resource busy")
    with busy, atomic_folder(tmp_path / "out", if_exists="replace") as tmp:
        (tmp / "meta.json").write_text("new")
    assert (tmp_path / "out" / "meta.json").read_text() == "old" and no_leftovers(tmp_path)


def test_keep_lets_the_first_complete_writer_win(tmp_path):
    with atomic_folder(tmp_path / "cache", if_exists="keep") as first:
        with atomic_folder(tmp_path / "cache", if_exists="keep") as second:
            (second / "meta.json").write_text("second")
        (first / "meta.json").write_text("first")
    assert (tmp_path / "cache" / "meta.json").read_text() == "second"
    assert no_leftovers(tmp_path)


def test_resolve_inputs_skips_hidden_files(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert [p.name for p in resolve_inputs(tmp_path)] == ["a.txt", "b.py", "c.md"]
    assert [p.name for p in resolve_inputs(str(tmp_path / "**" / "*.py"))] == ["b.py"]
    with pytest.raises(InputError, match="no input"):
        resolve_inputs([])
    monkeypatch.chdir(tmp_path)
    assert resolve_inputs("a.txt") == [Path("a.txt")]


def test_inputs_are_sorted_by_path_and_each_file_is_read_once(tmp_path, monkeypatch):
    texts = {"b.txt": "b\n", "a/z.txt": "z\n", "c/d/e.txt": "e\n", "a.txt": "a\n"}
    corpus = write_corpus(tmp_path / "corpus", texts)
    files = resolve_inputs(corpus)
    assert files == sorted(files) == resolve_inputs(str(corpus / "**" / "*.txt"))  # as a glob's
    monkeypatch.chdir(tmp_path)
    spellings = ["corpus/a.txt", str(corpus / "a.txt"), "corpus/../corpus/a.txt", "corpus"]
    again = resolve_inputs(spellings)
    assert again[0] == Path("corpus/a.txt") and len(again) == len(texts)  # the first spelling


def test_documents_counts_the_files_that_hold_text(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", {**TEXTS, "empty.txt": ""})
    out = tmp_path / "out"
    meta = prepare_bins(corpus, out, tokenizer="char", val_fraction=0, progress=False)
    separators = int((bins(out)["train"] == load_tokenizer(out).eos_id).sum())
    assert meta["documents"] == separators == len(TEXTS) and len(meta["sources"]) == len(TEXTS) + 1


def test_a_file_shorter_than_a_split_period_is_split_too(tmp_path):
    (tmp_path / "t.txt").write_text("a few words of text\n" * 4)
    meta = prepare_bins(tmp_path / "t.txt", tmp_path / "out", tokenizer="char", val_fraction=0.5, progress=False)  # fmt: skip
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0


def test_a_malformed_tokenizer_is_one_error_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "tk").mkdir()
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, "--input", str(corpus), "--tokenizer", str(tmp_path / "tk"), "--out", str(out))  # fmt: skip
    assert code == 2 and err == (
        f"error: tokenizer folder '{tmp_path / 'tk'}' holds no tokenizer.json: "
        "expected a tokenizer.json file or a folder holding one\n"
    )
    (tmp_path / "tk" / "tokenizer.json").write_text('{"type": "llmfn-char", "chars": [1, 2]}')
    code, err = run_cli(tmp_path, "--input", str(corpus), "--tokenizer", str(tmp_path / "tk"), "--out", str(out))  # fmt: skip
    assert code == 2 and err == (
        f"error: {tmp_path / 'tk' / 'tokenizer.json'}: 'chars' must be a list of single "
        "characters (entry 0 is int 1)\n"
    )
    assert not out.exists() and no_leftovers(tmp_path)


def test_a_folder_walk_skips_prepared_datasets(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    prepare_bins(corpus / "a.txt", tmp_path / "bins", tokenizer="char", progress=False)
    (tmp_path / "bins").rename(corpus / "sub" / "bins")  # an earlier output, moved into the corpus
    assert [p.name for p in resolve_inputs(corpus)] == ["a.txt", "b.py", "c.md"]
    meta = prepare_bins(corpus, tmp_path / "out", tokenizer="char", progress=False)
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "b.py", "c.md"]
    with pytest.raises(InputError) as caught:  # the prepared folder itself as input
        resolve_inputs(corpus / "sub" / "bins")
    assert str(caught.value) == (
        f"input folder '{corpus / 'sub' / 'bins'}' is a prepared dataset (its meta.json is of "
        '"llmfn-token-bin"), not text: give the text files it was made from'
    )
    (corpus / "notes").mkdir()  # a meta.json of another format is text like any other file
    (corpus / "notes" / "meta.json").write_text('{"format": "mine"}')
    assert corpus / "notes" / "meta.json" in resolve_inputs(corpus)


def test_a_folder_of_skipped_files_says_they_are_skipped(tmp_path):
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".notes").write_text("text\n")
    code, err = run_cli(tmp_path, "--input", str(tmp_path / "hidden"), "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 2 and err == (
        f"error: input folder '{tmp_path / 'hidden'}' holds no files to read: hidden files and "
        f"folders are skipped ({tmp_path / 'hidden' / '.notes'})\n"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"input folder '.*empty' holds no files$"):
        resolve_inputs(tmp_path / "empty")


def test_a_split_that_leaves_no_training_tokens_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "a.txt"), "--tokenizer", "char", "--out", str(out)]
    code, err = run_cli(tmp_path, *args)
    assert code == 2 and err.startswith(
        "error: --val-fraction 0.005 leaves nothing to train on: all 3 tokens of this 2-byte "
        "input went to validation"
    )
    assert err.endswith("lower --val-fraction (0 holds out nothing) or give more text\n")
    assert not out.exists() and no_leftovers(tmp_path)
    earlier = {"meta.json": '{"format": "llmfn-token-bin"}'}  # a dataset prepared before
    write_corpus(out, earlier)
    assert run_cli(tmp_path, *args, "--overwrite")[0] == 2
    assert snapshot(out) == {"meta.json": earlier["meta.json"].encode()} and no_leftovers(tmp_path)
    message = r"^val_fraction=0.005 leaves nothing to train on: .* lower val_fraction \(0 holds"
    with pytest.raises(InputError, match=message):  # from Python: the Python option
        prepare_bins(tmp_path / "a.txt", tmp_path / "py", tokenizer="char", progress=False)
    assert not (tmp_path / "py").exists()


def test_python_errors_name_the_python_options(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    options = {"tokenizer": "char", "val_fraction": 0, "progress": False}
    prepare_bins(corpus, tmp_path / "out", **options)
    with pytest.raises(FileExistsError) as caught:
        prepare_bins(corpus, tmp_path / "out", **options)
    assert str(caught.value) == (
        f"output folder '{tmp_path / 'out'}' already exists: choose another folder or pass "
        'if_exists="replace" to replace it'
    )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match='if_exists="replace" replaces only a folder written'):
        prepare_bins(corpus, tmp_path / "notes", if_exists="replace", **options)
    code, err = run_cli(tmp_path, "--input", str(corpus), "--out", str(tmp_path / "out"))
    assert code == 2 and "or pass --overwrite to replace it" in err  # the CLI names its flag
