"""SFT: JSONL records -> rows with a loss mask exactly on the answers, packed or padded."""

import json
import re

import numpy as np
import pytest
import torch

from llmfn.data import CharTokenizer, SFTDataModule
from llmfn.data.sft_module import held_out, pack_rows
from llmfn.data.sft_records import RecordError, read_records, render, tokenize_example

SEQ, BATCH = 96, 4


def records(count: int) -> list[dict]:
    out = []
    for i in range(count):
        if i % 3 == 0:
            out.append({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}!"},
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": f"{i} again."},
            ]})  # fmt: skip
        else:
            out.append({"prompt": f"What is {i} + 1?", "response": f"It is {i + 1}."})
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    return str(path)


def module(tmp_path, count=60, **options) -> SFTDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / "chat.jsonl", records(count))
    defaults = dict(
        seq_len=SEQ,
        batch_size=BATCH,
        tokenizer="char",
        cache_dir=tmp_path / "cache",
        val_fraction=0.1,
    )
    data = SFTDataModule(path, **{**defaults, **options})
    data.prepare()
    data.setup(rank=0, world_size=1)
    return data


def answers_in(batch, tokenizer) -> list[str]:
    """The texts the rows are trained to produce: each run of kept targets, decoded."""
    out = []
    for row in batch["targets"].tolist():
        runs, current = [], []
        for token in row + [-100]:
            if token != -100:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        out += [tokenizer.decode(run) for run in runs]
    return out


ANSWERS = (
    {f"It is {i + 1}." for i in range(100)}
    | {f"{i}!" for i in range(100)}
    | {f"{i} again." for i in range(100)}
)


def test_render_marks_only_answers():
    pieces = render({"prompt": "Hi?", "response": "Hello."})
    assert pieces == [
        ("User: Hi?\n", False),
        ("Assistant: ", False),
        ("Hello.", True),
        None,
        ("\n", False),
    ]


def test_tokenized_mask_covers_answer_and_eos():
    tok = CharTokenizer.train(["User: Hi?\nAssistant: Hello.\n"])
    ids, learn = tokenize_example(render({"prompt": "Hi?", "response": "Hello."}), tok)
    assert tok.decode(ids.tolist()) == "User: Hi?\nAssistant: Hello.\n"
    assert tok.decode(ids[learn].tolist()) == "Hello." and ids[learn][-1] == tok.eos_id
    assert learn.sum() == len("Hello.") + 1


def test_targets_are_next_tokens_on_answers_only(tmp_path):
    data = module(tmp_path, pack=False)
    batch = data.train_batch(0)
    assert batch["inputs"].shape == batch["targets"].shape == (BATCH, SEQ)
    assert batch["inputs"].dtype == batch["targets"].dtype == torch.long
    kept = batch["targets"] != -100
    assert torch.equal(batch["targets"][:, :-1][kept[:, :-1]], batch["inputs"][:, 1:][kept[:, :-1]])
    answers = answers_in(batch, data.tokenizer)
    assert len(answers) >= BATCH and set(answers) <= ANSWERS  # answers only, each complete


def test_packing_fills_rows_and_padding_does_not(tmp_path):
    packed = module(tmp_path / "p", pack=True)
    padded = module(tmp_path / "q", pack=False)
    train_examples = 60 - 6
    assert len(padded.train_rows[0]) == train_examples
    assert len(packed.train_rows[0]) < 0.8 * train_examples
    for data in (packed, padded):
        ids, learn = data.train_rows
        assert ids.shape[1] == SEQ + 1 and learn.shape == ids.shape
        assert (ids[~learn] >= 0).all() and not learn[ids == data.pad_id].any()
        answers = [
            a
            for i in range(data.steps_per_epoch)
            for a in answers_in(data.train_batch(i), data.tokenizer)
        ]
        assert len(answers) >= data.steps_per_epoch * BATCH and set(answers) <= ANSWERS


def test_pack_rows_keeps_examples_whole_and_truncates_long_ones():
    a = (np.arange(1, 5), np.array([0, 1, 1, 1], dtype=bool))
    b = (np.arange(5, 8), np.ones(3, dtype=bool))
    long = (np.arange(10, 30), np.ones(20, dtype=bool))
    ids, learn, truncated = pack_rows([a, b, a, long], window=8, pad_id=0, pack=True)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0], [1, 2, 3, 4, 0, 0, 0, 0], list(range(10, 18))]
    assert (
        learn[0].tolist() == [False, True, True, True, True, True, True, False] and truncated == 1
    )


def test_batches_are_pure_and_val_is_fixed_with_fixed_shapes(tmp_path):
    data = module(tmp_path, count=100, val_batches=2, pack=False)  # 10 val rows
    assert torch.equal(data.train_batch(5)["inputs"], data.train_batch(5)["inputs"])
    vals = list(data.val_batches())
    assert len(vals) == 2 and all(v["inputs"].shape == (BATCH, SEQ) for v in vals)
    short = list(
        module(tmp_path / "short", count=25, val_batches=4, pack=False).val_batches()
    )  # 2 val examples
    assert len(short) == 1 and short[0]["inputs"].shape == (BATCH, SEQ)
    assert (short[0]["targets"][2:] == -100).all() and (short[0]["targets"][:2] != -100).any()


def test_held_out_spreads_the_val_examples():
    mask = held_out(100, 0.05)
    assert mask.sum() == 5 and np.flatnonzero(mask).tolist() == [19, 39, 59, 79, 99]
    assert not held_out(10, 0).any()


def test_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "only"}\n')
    with pytest.raises(
        RecordError, match=r"bad.jsonl:2: expected .*prompt.*response.*got keys \['prompt'\]"
    ):
        [render(r, where) for where, r in read_records(path)]
    path.write_text("{oops\n")
    with pytest.raises(RecordError, match="bad.jsonl:1: not valid JSON"):
        list(read_records(path))
    with pytest.raises(RecordError, match="no assistant message"):
        render({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(RecordError, match="message 0: 'role' is 'robot', expected one of system"):
        render({"messages": [{"role": "robot", "content": "hi"}]})
    with pytest.raises(FileNotFoundError, match="nope.jsonl' does not exist"):
        SFTDataModule(tmp_path / "nope.jsonl", seq_len=8, batch_size=2)
    with pytest.raises(IsADirectoryError, match="is a folder: expected a JSONL file"):
        SFTDataModule(tmp_path, seq_len=8, batch_size=2)


def test_values_of_the_wrong_type_name_the_field(tmp_path):
    path = tmp_path / "types.jsonl"
    path.write_text('{"prompt": 1, "response": "b"}\n')
    with pytest.raises(RecordError, match=r"types.jsonl:1: 'prompt' is int, expected str$"):
        [render(r, where) for where, r in read_records(path)]
    for messages, message in [
        ([{"role": "user", "content": ["hi"]}], "message 0: 'content' is list, expected str"),
        (["hi"], "message 0 is str, expected an object {role, content}"),
        ([{"content": "hi"}], "message 0: 'role' is missing, expected one of system, user"),
        ("hi", "'messages' is str, expected a non-empty list"),
    ]:
        with pytest.raises(RecordError, match=re.escape(message)):
            render({"messages": messages})


def test_unexpected_keys_name_file_line_and_the_keys_accepted(tmp_path):
    path = tmp_path / "keys.jsonl"
    for record, message in [
        ({"system": "Be brief.", "prompt": "a", "response": "b"},
         "keys.jsonl:1: unexpected key 'system': a prompt/response record holds only prompt, response"),
        ({"messages": [{"role": "assistant", "content": "b"}], "prompt": "a"},
         "keys.jsonl:1: unexpected key 'prompt': a messages record holds only messages"),
        ({"messages": [{"role": "assistant", "content": "b", "weight": 0}]},
         "keys.jsonl:1: message 0: unexpected key 'weight': a message holds only role, content"),
    ]:  # fmt: skip
        write_jsonl(path, [record])
        with pytest.raises(RecordError, match=re.escape(message)):
            [render(r, where) for where, r in read_records(path)]


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8-sig")
    assert [record for _, record in read_records(path)] == rows


def test_undecodable_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "caf\u00e9?", "response": "oui"}]
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("latin-1"))
    with pytest.raises(
        RecordError, match=r"latin1.jsonl:2: invalid UTF-8 at byte 16 of the line \(0xe9"
    ):
        list(read_records(path))


def test_responses_truncated_away_are_an_error(tmp_path):
    long = [{"prompt": "x" * 200 + str(i), "response": "yes"} for i in range(20)]
    path = write_jsonl(tmp_path / "long.jsonl", long)
    data = SFTDataModule(path, seq_len=32, batch_size=2, tokenizer="char", cache_dir=tmp_path)
    data.prepare()
    with (
        pytest.warns(UserWarning, match="truncated"),
        pytest.raises(ValueError, match=r"long.jsonl: no response tokens remain after truncating examples to seq_len\+1=33 tokens: raise model.max_seq_len"),
    ):  # fmt: skip
        data.setup()
    some = write_jsonl(tmp_path / "some.jsonl", long[:2] + records(20))  # some survive: a warning
    data = SFTDataModule(some, seq_len=32, batch_size=2, tokenizer="char", cache_dir=tmp_path)
    data.prepare()
    with pytest.warns(UserWarning, match="2 examples are longer"):
        data.setup()
    assert (data.train_batch(0)["targets"] != -100).any()


def test_bpe_sft_and_too_few_rows(tmp_path):
    data = module(tmp_path, tokenizer="bpe", vocab_size=300)
    assert data.vocab_size <= 300 and data.tokenizer.eos_id is not None
    answers = [
        a
        for i in range(data.steps_per_epoch)
        for a in answers_in(data.train_batch(i), data.tokenizer)
    ]
    assert any(a.startswith("It is ") for a in answers) and not any("User:" in a for a in answers)
    with pytest.raises(ValueError, match="only 3 examples for batch_size=4"):
        module(tmp_path / "few", count=3, pack=False)


def test_a_malformed_tokenizer_names_the_file_and_field(tmp_path):
    (tmp_path / "tk").mkdir()
    (tmp_path / "tk" / "tokenizer.json").write_text('{"type": "llmfn-char", "chars": [1, 2]}')
    message = f"{tmp_path / 'tk' / 'tokenizer.json'}: 'chars' must be a list of single characters (entry 0 is int 1)"  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
        module(tmp_path, tokenizer=str(tmp_path / "tk"))
