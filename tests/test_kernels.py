"""The CPU decode kernels (llmfn/kernels/*.c): the panel matmul against F.linear and the
single-query attention against SDPA, their fallbacks, gradients, torch.compile, and how
building them fails."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfn.kernels import build
from llmfn.layers import decode_attention as da
from llmfn.layers.decode_attention import decode_attention
from llmfn.layers.panel_matmul import kernel_available, panel_matmul, panel_weight, unpanel

TOL = {"atol": 1e-4, "rtol": 1e-4}


def test_the_kernels_build_on_this_machine():
    # CI and every dev machine that runs torch.compile on CPU have a C compiler.
    assert kernel_available(), "llmfn/kernels/panel_matmul.c did not build (see the warning)"
    assert da.load_kernel() is not None, "llmfn/kernels/decode_attention.c did not build"


def with_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),  # blocks of 8 rows and every remainder
    in_features=st.integers(1, 70),  # K loops with and without a remainder of the unrolling
    num_panels=st.integers(1, 5),
    threads=st.sampled_from([1, 2]),
    transposed_x=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_kernel_equals_f_linear(rows, in_features, num_panels, threads, transposed_x, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(8 * num_panels, in_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    if transposed_x:
        x = x.t().contiguous().t()  # same values, column-major: the kernel copies it
    y = with_threads(threads, lambda: panel_matmul(x, panel_weight(weight)))
    torch.testing.assert_close(y, F.linear(x, weight), **TOL)


def test_panels_round_trip_and_the_fallbacks_compute_the_same_product():
    weight = torch.randn(32, 12)
    assert torch.equal(unpanel(panel_weight(weight)), weight.t())
    x = torch.randn(5, 12)
    expected = F.linear(x, weight)
    # Width 16 and bfloat16 are not the kernel's: torch.matmul computes them.
    torch.testing.assert_close(panel_matmul(x, panel_weight(weight, 16)), expected, **TOL)
    low = panel_matmul(x.bfloat16(), panel_weight(weight.bfloat16()))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, atol=0.1, rtol=0.05)


def test_gradients_flow_through_panels_like_through_f_linear():
    weight = torch.randn(16, 6, requires_grad=True)
    x = torch.randn(3, 6, requires_grad=True)
    panels = panel_weight(weight.detach()).requires_grad_()
    (panel_matmul(x, panels) ** 2).sum().backward()
    grad_x, grad_panels = x.grad.clone(), panels.grad
    x.grad = None
    (F.linear(x, weight) ** 2).sum().backward()
    torch.testing.assert_close(grad_x, x.grad, **TOL)
    torch.testing.assert_close(grad_panels, panel_weight(weight.grad), **TOL)


def test_vmap_over_panels_equals_f_linear():
    weight, xs = torch.randn(16, 4), torch.randn(3, 2, 4)
    out = torch.vmap(lambda x: panel_matmul(x, panel_weight(weight)))(xs)
    torch.testing.assert_close(out, F.linear(xs, weight), **TOL)


def test_compiled_linear_over_panels_calls_the_op_and_equals_eager():
    from llmfn.layers.linear import linear

    weight, bias = torch.randn(24, 10), torch.randn(24)
    x = torch.randn(2, 3, 10)
    panels = panel_weight(weight)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(linear, backend=backend, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, panels, bias), F.linear(x, weight, bias), **TOL)
    assert "llmfn.panel_matmul" in graphs[0].code


# --- single-query attention -------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 4]),  # MHA, GQA, MQA
    head_dim=st.sampled_from([8, 24, 64, 128]),  # 64 and 128 have their own loops
    num_keys=st.integers(1, 40),
    shared_mask=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_decode_attention_equals_sdpa(
    rows, kv_heads, group, head_dim, num_keys, shared_mask, threads, seed
):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, rows, kv_heads, num_keys + 5, head_dim, generator=gen)
    k, v = cache[0, :, :, :num_keys], cache[1, :, :, :num_keys]  # slices of a longer cache
    q = 3 * torch.randn(rows, kv_heads * group, 1, head_dim, generator=gen)
    visible = torch.rand(1 if shared_mask else rows, 1, 1, num_keys, generator=gen) < 0.7
    visible[..., -1] = True  # the query sees itself
    out = with_threads(threads, lambda: decode_attention(q, k, v, visible))
    torch.testing.assert_close(out, da.sdpa(q, k, v, visible), **TOL)


def test_decode_attention_with_gradients_is_sdpa():
    q = torch.randn(2, 4, 1, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    visible = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    out = decode_attention(q, k, v, visible)
    assert out.grad_fn is not None
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_vmap_over_decode_attention_equals_sdpa():
    q, k, v = torch.randn(3, 2, 4, 1, 8), torch.randn(3, 2, 2, 5, 8), torch.randn(3, 2, 2, 5, 8)
    visible = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    out = torch.vmap(lambda q, k, v: decode_attention(q, k, v, visible))(q, k, v)
    expected = torch.stack([da.sdpa(*qkv, visible) for qkv in zip(q, k, v, strict=True)])
    torch.testing.assert_close(out, expected, **TOL)


def test_compiled_decode_attention_calls_the_op():
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    visible = torch.tensor([[[[True, False, True, True, False, True]]]])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    with torch.no_grad():
        out = torch.compile(decode_attention, backend=backend, fullgraph=True)(q, k, v, visible)
    torch.testing.assert_close(out, da.sdpa(q, k, v, visible), **TOL)
    assert "llmfn.decode_attention" in graphs[0].code


# --- building ----------------------------------------------------------------------------------
@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The kernels as on a machine that has not built them yet, caching into tmp."""

    monkeypatch.setenv("LLMFN_CACHE_DIR", str(tmp_path))
    build.clear_cache()
    yield tmp_path
    build.clear_cache()


def test_a_missing_compiler_warns_once_and_decode_falls_back(monkeypatch, fresh_build):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.warns(UserWarning, match="no C compiler 'no-such-compiler-xyz' \\(set \\$CC\\)"):
        assert not kernel_available()
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert da.load_kernel() is None
    assert not later  # the missing compiler was said once
    x, weight = torch.randn(3, 4), torch.randn(8, 4)
    torch.testing.assert_close(panel_matmul(x, panel_weight(weight)), F.linear(x, weight), **TOL)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    visible = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    torch.testing.assert_close(decode_attention(q, k, v, visible), da.sdpa(q, k, v, visible))


def test_a_failing_build_names_the_kernel_and_the_command(monkeypatch, fresh_build):
    monkeypatch.setenv("CC", "false")  # exists, always fails
    with pytest.warns(UserWarning, match="panel_matmul did not build .*false -O3 .*panel_matmul.c"):
        assert not kernel_available()
    assert not list(fresh_build.glob("*.so"))


def test_the_build_is_cached_by_source_and_flags(fresh_build):
    assert kernel_available()
    (built,) = fresh_build.glob("panel_matmul-*.so")
    stamp = built.stat().st_mtime_ns
    build.clear_cache()
    assert kernel_available()
    assert built.stat().st_mtime_ns == stamp and os.listdir(fresh_build) == [built.name]
