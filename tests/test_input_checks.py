"""`decoder`'s input checks (`llmfn.input_checks.check_inputs`): misuse of forward / loss / decoder is
one ValueError naming what was given and what was expected, and the checks cost no graph
break or recompile under torch.compile and do not get in the way of vmap / grad."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import grad, vmap

from llmfn import decode_weights, decoder, forward, init_params, loss
from llmfn.model import forward_cached, init_cache, param_shapes
from tests.model_fixtures import DENSE

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = init_params(DENSE)
TOKENS = torch.randint(0, DENSE.vocab_size, (3, 8), generator=torch.Generator().manual_seed(0))
LEARNED = DENSE.replace(position="learned")
LEARNED_PARAMS = init_params(LEARNED)
MHA = DENSE.replace(num_kv_heads=4)  # q, k and v of 4 heads
MHA_PARAMS = init_params(MHA)
ALIBI = DENSE.replace(position="alibi")
ALIBI_PARAMS = init_params(ALIBI)


def batch(tokens: torch.Tensor = TOKENS) -> dict:
    return {"inputs": tokens, "targets": tokens.roll(-1, 1)}


def additive_mask() -> torch.Tensor:
    """[3, 8] HF-internal style: 0 where a key is kept, -inf at row 0's two padded slots."""
    mask = torch.zeros(3, 8)
    mask[0, :2] = float("-inf")
    return mask


def stacked_ensemble():
    return torch.stack([PARAMS, init_params(DENSE, seed=1)])


BAD_INPUTS = {
    "1-D tokens": (
        lambda: forward(PARAMS, TOKENS[0], DENSE),
        r"tokens must be \[B, T\] int64 \(or int32\) ids, got \[8\] torch.int64: under vmap",
    ),
    "vmap over examples, tokens [T] inside": (
        lambda: vmap(lambda row: forward(PARAMS, row, DENSE))(TOKENS),
        r"got \[8\] torch.int64: under vmap over examples, run the model on tokens\[None\]",
    ),
    "float tokens": (
        lambda: forward(PARAMS, TOKENS.float(), DENSE),
        r"tokens must be \[B, T\] int64 \(or int32\) ids, got \[3, 8\] torch.float32$",
    ),
    "token ids to loss": (
        lambda: loss(PARAMS, TOKENS, DENSE),
        r'loss takes a batch \{"inputs": \[B, T\], "targets": \[B, T\]\}, got Tensor',
    ),
    "a batch without targets to loss": (
        lambda: loss(PARAMS, {"inputs": TOKENS}, DENSE),
        r"got \['inputs'\] \(forward takes the token ids\)",
    ),
    "3-D tokens to loss": (
        lambda: loss(PARAMS, batch(TOKENS[None]), DENSE),
        r"got \[1, 3, 8\] torch.int64",
    ),
    "id == vocab_size": (
        lambda: forward(PARAMS, torch.full((2, 8), 64), DENSE),
        r"token ids must be in \[0, model.vocab_size=64\), got 64 \.\. 64",
    ),
    "negative id": (
        lambda: loss(PARAMS, {"inputs": TOKENS - 5, "targets": TOKENS}, DENSE),
        r"token ids must be in \[0, model.vocab_size=64\), got -5 \.\. ",
    ),
    "T > max_seq_len, learned positions": (
        lambda: forward(init_params(LEARNED), torch.zeros(2, 40, dtype=torch.long), LEARNED),
        r"tokens \[B, T=40\] exceed model.max_seq_len=16 \(learned positions\)",
    ),
    "positions= past the learned table": (
        lambda: forward(LEARNED_PARAMS, TOKENS, LEARNED, positions=torch.arange(10, 18)[None]),
        r"positions must be in \[0, model.max_seq_len=16\) with learned positions, got 10 \.\. 17",
    ),
    "negative positions=, learned": (
        lambda: forward(LEARNED_PARAMS, TOKENS, LEARNED, positions=torch.arange(-1, 7)[None]),
        r"positions must be in \[0, model.max_seq_len=16\) .*, got -1 \.\. 6",
    ),
    "cache slots past max_seq_len, learned": (
        lambda: forward_cached(
            LEARNED_PARAMS, TOKENS, LEARNED, init_cache(LEARNED, 3, 32), torch.tensor(12)
        ),
        r"cache_start=12 \+ T=8 tokens exceed model.max_seq_len=16 \(learned positions\)",
    ),
    "attention_mask [B, T - 1]": (
        lambda: forward(PARAMS, TOKENS, DENSE, attention_mask=torch.ones(3, 7)),
        r"attention_mask \[3, 7\] does not fit tokens \[3, 8\]: expected \[B, T\] like tokens, "
        r"\[3, 8\]",
    ),
    "attention_mask [T] to loss": (
        lambda: loss(PARAMS, {**batch(), "attention_mask": torch.ones(8)}, DENSE),
        r"attention_mask \[8\] does not fit tokens \[3, 8\]",
    ),
    "attention_mask [B, T] with a cache": (
        lambda: forward_cached(
            PARAMS,
            TOKENS,
            DENSE,
            init_cache(DENSE, 3, 12),
            torch.tensor(0),
            attention_mask=torch.ones(3, 8),
        ),
        r"attention_mask \[3, 8\] does not fit tokens \[3, 8\]: expected \[B, max_len\] of the "
        r"cache, \[3, 12\]",
    ),
    "positions [T] with T == num_heads (RoPE was silently wrong)": (
        lambda: forward(MHA_PARAMS, TOKENS[:, :4], MHA, positions=torch.arange(4)),
        r"positions must be \[B, T\] \(or \[1, T\]\) like tokens \[3, 4\], got \[4\]: pass "
        r"positions\[None\]",
    ),
    "positions [T], ALiBi (was an IndexError)": (
        lambda: forward(ALIBI_PARAMS, TOKENS, ALIBI, positions=torch.arange(8)),
        r"positions must be \[B, T\] \(or \[1, T\]\) like tokens \[3, 8\], got \[8\]",
    ),
    "positions [B, T + 1]": (
        lambda: forward(PARAMS, TOKENS, DENSE, positions=torch.arange(9).expand(3, 9)),
        r"positions must be .* like tokens \[3, 8\], got \[3, 9\]$",
    ),
    "positions [2, T] for 3 rows": (
        lambda: forward(PARAMS, TOKENS, DENSE, positions=torch.arange(8).expand(2, 8)),
        r"positions must be .* like tokens \[3, 8\], got \[2, 8\]$",
    ),
    "additive float attention_mask (0 keep, -inf masked)": (
        lambda: forward(PARAMS, TOKENS, DENSE, attention_mask=additive_mask()),
        r"attention_mask must be bool or integer, 1 = real token, 0 = padding, got "
        r"torch.float32: an additive float mask \(0 = keep, -inf = masked\) means the opposite",
    ),
    "float 0/1 attention_mask to loss": (
        lambda: loss(PARAMS, {**batch(), "attention_mask": torch.ones(3, 8)}, DENSE),
        r"attention_mask must be bool or integer, .* mask.long\(\) for a float 0/1 mask",
    ),
    "integer attention_mask of 2s": (
        lambda: forward(PARAMS, TOKENS, DENSE, attention_mask=torch.full((3, 8), 2)),
        r"attention_mask must hold 1 \(real token\) or 0 \(padding\), got 2 \.\. 2",
    ),
    "cache_start + T past the cache's slots": (
        lambda: forward_cached(PARAMS, TOKENS, DENSE, init_cache(DENSE, 3, 12), torch.tensor(6)),
        r"cache_start=6 \+ T=8 tokens do not fit the cache's max_len=12 slots: "
        r"init_cache\(cfg, batch_size, max_len\) with max_len >= 14",
    ),
    "cache of another batch size": (
        lambda: forward_cached(PARAMS, TOKENS, DENSE, init_cache(DENSE, 2, 12), torch.tensor(0)),
        r"cache has batch size 2 but tokens are \[3, 8\]: build it with "
        r"init_cache\(cfg, batch_size=3, max_len\)",
    ),
    "nested dict params": (
        lambda: forward(PARAMS.to_dict(), TOKENS, DENSE),
        r"params must be a nested TensorDict as init_params returns, got dict: wrap a nested "
        r"dict as TensorDict\(params, batch_size=\[\]\)",
    ),
    "flattened params (flatten_keys)": (
        lambda: forward(PARAMS.flatten_keys("."), TOKENS, DENSE),
        r"params has dotted keys \['embed.weight', .*: a flat tree .* "
        r"params.unflatten_keys\('.'\)",
    ),
    "a batch dict to forward": (
        lambda: forward(PARAMS, batch(), DENSE),
        r"tokens must be a \[B, T\] tensor of ids, got dict: forward takes the ids "
        r"\(batch\['inputs'\]\); loss takes the batch dict",
    ),
    "targets of another shape": (
        lambda: loss(PARAMS, {"inputs": TOKENS, "targets": TOKENS[:, 1:]}, DENSE),
        r"targets \[3, 7\], inputs \[3, 8\]: expected targets of the inputs' shape",
    ),
    "target id == vocab_size": (
        lambda: loss(PARAMS, {"inputs": TOKENS, "targets": torch.full((3, 8), 64)}, DENSE),
        r"targets must be in \[0, model.vocab_size=64\) or -100, got 64 \.\. 64",
    ),
    "float targets": (
        lambda: loss(PARAMS, {"inputs": TOKENS, "targets": TOKENS.float()}, DENSE),
        r"targets must be integer token ids \(any int dtype; -100 = no loss\), got torch.float32",
    ),
    "stacked ensemble without vmap": (
        lambda: forward(stacked_ensemble(), TOKENS, DENSE),
        r"params has batch_size \[2\] \(a stacked ensemble\): run it under torch.func.vmap",
    ),
    "2-layer params, 1-layer cfg": (
        lambda: forward(PARAMS, TOKENS, DENSE.replace(num_layers=1)),
        r"params has 2 layers but model.num_layers=1",
    ),
    "2-layer params, 3-layer cfg (grad of loss)": (
        lambda: grad(lambda p: loss(p, batch(), DENSE.replace(num_layers=3))[0])(PARAMS),
        r"params has 2 layers but model.num_layers=3",
    ),
    "other kv heads: a fused wqkv of another size": (
        lambda: forward(PARAMS, TOKENS, DENSE.replace(num_kv_heads=4)),
        r"params 'layers.0.attn.wqkv' has shape \[64, 32\] but the model config gives "
        r"\[96, 32\] \(hidden_size=32, num_heads=4, kv_heads=4",
    ),
    "tied params, untied cfg (no lm_head)": (
        lambda: decoder(init_params(DENSE.replace(tie_embeddings=True)), TOKENS, DENSE),
        r"params do not match the model config: missing \['lm_head.weight'\], unexpected \[\]",
    ),
    "untied params, tied cfg": (
        lambda: forward(PARAMS, TOKENS, DENSE.replace(tie_embeddings=True)),
        r"missing \[\], unexpected \['lm_head.weight'\]",
    ),
    "rope params, learned cfg": (
        lambda: forward(PARAMS, TOKENS, LEARNED),
        r"missing \['pos.weight'\]",
    ),
    "another vocabulary": (
        lambda: forward(PARAMS, TOKENS, DENSE.replace(vocab_size=32)),
        r"params 'embed.weight' has shape \[64, 32\] but the model config gives \[32, 32\]",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_misuse_is_one_value_error_naming_given_and_expected(case):
    run, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message) as err:
        run()
    assert "\n" not in str(err.value)


def test_good_uses_still_run():
    tokens = TOKENS
    expected = forward(PARAMS, tokens, DENSE)
    # vmap over examples with tokens[None] inside, and over a leading dim of a [N, B, T] batch
    per_row = vmap(lambda row: forward(PARAMS, row[None], DENSE)[0])(tokens)
    torch.testing.assert_close(per_row, expected, rtol=1e-5, atol=1e-5)
    per_batch = vmap(lambda rows: forward(PARAMS, rows, DENSE))(tokens[None])
    torch.testing.assert_close(per_batch[0], expected, rtol=1e-5, atol=1e-5)
    # an ensemble under vmap; per-example grads; int32 ids; decode_weights' panel layout
    members = vmap(lambda p: forward(p, tokens, DENSE))(stacked_ensemble())
    torch.testing.assert_close(members[0], expected, rtol=1e-5, atol=1e-5)
    per_example = vmap(grad(lambda p, row: loss(p, batch(row[None]), DENSE)[0]), (None, 0))
    assert per_example(PARAMS, tokens)["embed", "weight"].shape == (3, 64, 32)
    torch.testing.assert_close(forward(PARAMS, tokens.int(), DENSE), expected)
    torch.testing.assert_close(forward(decode_weights(PARAMS), tokens, DENSE), expected)
    # a full cache-length mask with a cache, and T == max_seq_len with learned positions
    logits, _ = forward_cached(
        PARAMS,
        tokens,
        DENSE,
        init_cache(DENSE, 3, 12),
        torch.tensor(0),
        attention_mask=torch.ones(3, 12, dtype=torch.long),
    )
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    forward(LEARNED_PARAMS, torch.zeros(1, 16, dtype=torch.long), LEARNED)
    # learned positions up to the table's end: cache slots 8..15, and slots 20..27 of a longer
    # cache (the layout of left-padded generation) at positions= 8..15
    long_cache = init_cache(LEARNED, 3, 32)
    forward_cached(LEARNED_PARAMS, tokens, LEARNED, long_cache, torch.tensor(8))
    positions = torch.arange(8, 16)[None]
    logits, _ = forward_cached(
        LEARNED_PARAMS,
        tokens,
        LEARNED,
        long_cache,
        torch.tensor(20),
        positions=positions,
        attention_mask=(torch.arange(32) >= 20).expand(3, 32),
    )
    expected = forward(LEARNED_PARAMS, tokens, LEARNED, positions=positions)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_hf_style_positions_masks_and_full_caches_still_run():
    """positions [B, T] or [1, T] (HF's position_ids); bool, int64 and int32 0/1 masks alike;
    a cache filled to its last slot, from a Python int cache_start."""
    expected = forward(PARAMS, TOKENS, DENSE)
    steps = torch.arange(8)
    for positions in (steps[None], steps.expand(3, 8)):
        torch.testing.assert_close(forward(PARAMS, TOKENS, DENSE, positions=positions), expected)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :2] = 0
    padded = forward(PARAMS, TOKENS, DENSE, attention_mask=mask)
    assert not torch.allclose(padded[0], expected[0], atol=1e-3)
    for other in (mask.bool(), mask.int()):
        torch.testing.assert_close(forward(PARAMS, TOKENS, DENSE, attention_mask=other), padded)
    first, cache = forward_cached(PARAMS, TOKENS[:, :5], DENSE, init_cache(DENSE, 3, 8), 0)
    last, _ = forward_cached(PARAMS, TOKENS[:, 5:], DENSE, cache, torch.tensor(5))
    torch.testing.assert_close(torch.cat([first, last], 1), expected, rtol=1e-5, atol=1e-5)


def test_forward_and_loss_under_fake_tensor_mode():
    """Shape propagation under FakeTensorMode: the value checks skip fake tensors
    (`can_read_values`) rather than raise DataDependentOutputException."""
    with FakeTensorMode() as mode:
        params, tokens = LEARNED_PARAMS.apply(mode.from_tensor), mode.from_tensor(TOKENS)
        mask = mode.from_tensor(torch.ones(3, 8, dtype=torch.long))
        positions = mode.from_tensor(torch.arange(8)[None])
        logits = forward(params, tokens, LEARNED, attention_mask=mask, positions=positions)
        value, _ = loss(params, batch(tokens), LEARNED)
    assert logits.shape == (3, 8, 64) and value.shape == ()


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("with_grad", [False, True])
def test_int32_targets_give_the_int64_loss(chunk, with_grad):
    """Plain and chunked (`loss_chunk_size`) heads, with and without grad: the cross-entropy
    kernels take int64 targets only; int32 ones (as int32 tokens) are widened."""
    cfg = DENSE.replace(loss_chunk_size=chunk)
    targets = TOKENS.roll(-1, 1)
    targets[:, -1] = -100
    with torch.set_grad_enabled(with_grad):
        params = PARAMS.clone().apply(lambda leaf: leaf.requires_grad_(with_grad))
        value, metrics = loss(params, {"inputs": TOKENS.int(), "targets": targets.int()}, cfg)
        expected, _ = loss(params, {"inputs": TOKENS, "targets": targets}, cfg)
    torch.testing.assert_close(value, expected)
    assert metrics["tokens"] == 21


def test_param_shapes_are_init_params_keys_and_shapes_in_order():
    expected = {
        ".".join(key): tuple(leaf.shape)
        for key, leaf in PARAMS.items(include_nested=True, leaves_only=True)
    }
    assert list(param_shapes(DENSE).items()) == list(expected.items())
    assert param_shapes(DENSE) is param_shapes(DENSE.replace())  # cached per (equal) cfg
    with pytest.raises(TypeError):
        param_shapes(DENSE)["embed.weight"] = (1, 1)  # read-only: the cache is shared


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo_afterwards():
    """The misuse tests compile frames of the model's functions around their errors: forget
    them, so later tests count their own graphs."""
    yield
    torch._dynamo.reset()


def test_checks_add_no_graph_break_or_recompile_under_compile():
    """fullgraph=True fails on a graph break; error_on_recompile on a guard the checks add. New
    token values and new param values of the same shapes reuse the one graph (with a mask and
    positions: their dtype and shape checks are static)."""
    other = init_params(DENSE, seed=2)
    mask, positions = torch.ones(3, 8, dtype=torch.bool), torch.arange(8)[None]
    options = {"attention_mask": mask, "positions": positions}  # their static checks too
    compiled_forward = torch.compile(lambda p, t: forward(p, t, DENSE, **options), fullgraph=True)
    compiled_grad = torch.compile(grad(lambda p, b: loss(p, b, DENSE)[0]), fullgraph=True)
    # functorch's grad wrapper is one code object: other tests' compiled grads hold entries in
    # its cache, so this test's first call compiles anew; the second call must reuse it
    compiled_grad(PARAMS, batch(TOKENS))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for params, tokens in ((PARAMS, TOKENS), (other, TOKENS.flip(0))):
            torch.testing.assert_close(
                compiled_forward(params, tokens),
                forward(params, tokens, DENSE, **options),
                rtol=1e-5,
                atol=1e-5,
            )
            grads = compiled_grad(params, batch(tokens))
            expected = grad(lambda p, b: loss(p, b, DENSE)[0])(params, batch(tokens))
            torch.testing.assert_close(
                grads["layers", "1", "attn", "wqkv"],
                expected["layers", "1", "attn", "wqkv"],
                rtol=1e-4,
                atol=1e-6,
            )


def test_learned_position_checks_add_no_graph_break_or_recompile():
    """forward_cached of learned positions at new cache slots and positions= reuses one graph:
    the range checks read values in eager only."""
    compiled = torch.compile(
        lambda p, t, c, start, pos: forward_cached(p, t, LEARNED, c, start, positions=pos)[0],
        fullgraph=True,
    )
    cache = init_cache(LEARNED, 3, 16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for start in (0, 4, 8):
            positions = torch.arange(start, start + 8)[None]
            torch.testing.assert_close(
                compiled(LEARNED_PARAMS, TOKENS, cache, torch.tensor(start), positions),
                forward_cached(LEARNED_PARAMS, TOKENS, LEARNED, cache, torch.tensor(start))[0],
                rtol=1e-5,
                atol=1e-5,
            )


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_misuse_still_names_the_argument(fullgraph):
    """With fullgraph dynamo wraps the ValueError (its text kept); without, eager raises it."""
    compiled = torch.compile(lambda p, t: forward(p, t, DENSE), fullgraph=fullgraph)
    for tokens, message in ((TOKENS[0], r"got \[8\] torch.int64"), (TOKENS.float(), "float32")):
        with pytest.raises(Exception, match=r"tokens must be \[B, T\] int64 .*" + message):
            compiled(PARAMS, tokens)
