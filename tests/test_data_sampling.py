"""Which examples a batch holds: a pure function of (seed, index, rank, world_size)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import llmfn.data.sampling as sampling
from llmfn.data.sampling import SlotSampler, WindowSampler, permute, round_keys, spread_starts


@given(st.integers(1, 5000), st.integers(0, 2**40), st.integers(0, 50))
def test_permute_is_a_bijection(size, seed, epoch):
    image = permute(np.arange(size), size, round_keys(seed, epoch))
    assert np.array_equal(np.sort(image), np.arange(size))


def test_permutations_differ_by_seed_and_epoch():
    base = permute(np.arange(1000), 1000, round_keys(0, 0))
    assert not np.array_equal(base, np.arange(1000))
    assert not np.array_equal(base, permute(np.arange(1000), 1000, round_keys(1, 0)))
    assert not np.array_equal(base, permute(np.arange(1000), 1000, round_keys(0, 1)))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        permute(np.array([10]), 10, round_keys(0, 0))


@given(st.integers(8, 3000), st.integers(1, 4), st.integers(1, 4), st.integers(0, 10**6))
def test_one_epoch_visits_every_slot_at_most_once(num_slots, batch_size, world_size, seed):
    if num_slots < batch_size * world_size:
        return
    sampler = SlotSampler(num_slots, batch_size, world_size, seed)
    seen = np.concatenate(
        [sampler.slots(i, r) for i in range(sampler.steps_per_epoch) for r in range(world_size)]
    )
    assert len(np.unique(seen)) == len(seen) == sampler.steps_per_epoch * batch_size * world_size
    assert len(seen) > num_slots - batch_size * world_size  # only the remainder is skipped


def test_slots_are_a_pure_function_and_change_per_epoch():
    a = SlotSampler(100, 4, 2, seed=7)
    b = SlotSampler(100, 4, 2, seed=7)
    assert np.array_equal(a.slots(31, 1), b.slots(31, 1))
    assert not np.array_equal(a.slots(31, 1), SlotSampler(100, 4, 2, seed=8).slots(31, 1))
    epoch0 = np.concatenate([a.slots(i, 0) for i in range(a.steps_per_epoch)])
    epoch1 = np.concatenate([a.slots(i + a.steps_per_epoch, 0) for i in range(a.steps_per_epoch)])
    assert not np.array_equal(epoch0, epoch1)


def test_memoised_and_direct_permutations_agree(monkeypatch):
    sampler = SlotSampler(5000, 8, 2, seed=3)
    cached = [sampler.slots(i, r) for i in (0, 1, 400) for r in (0, 1)]
    monkeypatch.setattr(sampling, "MAX_CACHED_SLOTS", 0)
    direct = [sampler.slots(i, r) for i in (0, 1, 400) for r in (0, 1)]
    assert all(np.array_equal(x, y) for x, y in zip(cached, direct, strict=True))


@given(
    st.integers(300, 20_000),
    st.integers(2, 40),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 999),
    st.integers(0, 10**6),
)
def test_windows_of_one_step_never_overlap_across_ranks(
    num_tokens, window, batch_size, world_size, index, seed
):
    sampler = WindowSampler(num_tokens, window, batch_size, world_size, seed)
    if sampler.stride != window:
        return
    starts = np.sort(np.concatenate([sampler.starts(index, r) for r in range(world_size)]))
    assert starts.min() >= 0 and starts.max() + window <= num_tokens
    assert (np.diff(starts) >= window).all()


def test_short_stream_falls_back_to_distinct_overlapping_windows():
    sampler = WindowSampler(num_tokens=40, window=10, batch_size=4, world_size=2, seed=0)
    assert sampler.stride == 1
    starts = np.concatenate([sampler.starts(0, r) for r in range(2)])
    assert len(np.unique(starts)) == 8 and starts.max() <= 30
    with pytest.raises(
        ValueError,
        match="only 5 distinct windows of 10 tokens .* fit in 14 tokens, fewer than batch_size=4 × world_size=2",
    ):
        WindowSampler(num_tokens=14, window=10, batch_size=4, world_size=2).steps_per_epoch  # noqa: B018
    with pytest.raises(ValueError, match="fewer than one window"):
        WindowSampler(num_tokens=5, window=10, batch_size=1)


@given(st.integers(10, 5000), st.integers(2, 300), st.integers(1, 8), st.integers(1, 3))
def test_an_epoch_is_one_pass_over_the_tokens(num_tokens, window, batch_size, world_size):
    """Also when overlapping windows (stride 1) stand in for too few non-overlapping ones."""
    try:
        steps = WindowSampler(num_tokens, window, batch_size, world_size).steps_per_epoch
    except ValueError:
        return  # too little data for one batch
    tokens_per_step = window * batch_size * world_size
    assert steps >= 1 and (steps - 1) * tokens_per_step < num_tokens  # not one pass per window
    assert steps * tokens_per_step >= num_tokens - 3 * tokens_per_step  # nor much less than one


def test_window_grid_shifts_between_epochs():
    sampler = WindowSampler(num_tokens=100_000, window=101, batch_size=8, seed=0)
    offsets = {int(sampler.starts(e * sampler.steps_per_epoch, 0)[0] % 101) for e in range(6)}
    assert len(offsets) > 1


def test_bad_rank_and_index_are_errors():
    sampler = SlotSampler(100, 4, 2)
    with pytest.raises(ValueError, match="rank=2"):
        sampler.slots(0, 2)
    with pytest.raises(ValueError, match="index=-1"):
        sampler.slots(-1, 0)


def test_spread_starts():
    assert spread_starts(1000, 100, 4).tolist() == [0, 300, 600, 900]
    assert spread_starts(100, 100, 3).tolist() == [0, 0, 0]
