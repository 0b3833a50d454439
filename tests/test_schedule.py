"""LR schedules: values at the landmarks, floor, monotonicity, config, compile without recompiles."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

from llmfn.config import OptimConfig
from llmfn.schedule import SCHEDULES, learning_rate, lr_schedule_from_config

PEAK, FLOOR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 110
ARGS = {"peak_lr": PEAK, "min_lr": FLOOR, "warmup_steps": WARMUP, "total_steps": TOTAL}


def lr_at(step, schedule: str, **overrides) -> float:
    return learning_rate(torch.tensor(step), schedule=schedule, **{**ARGS, **overrides}).item()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_starts_near_zero_and_reaches_peak(schedule):
    assert lr_at(0, schedule) == pytest.approx(PEAK / (WARMUP + 1))
    assert lr_at(WARMUP // 2, schedule) == pytest.approx(PEAK * (WARMUP // 2 + 1) / (WARMUP + 1))
    assert lr_at(WARMUP, schedule) == pytest.approx(PEAK)
    warmup = learning_rate(torch.arange(WARMUP + 1), schedule=schedule, **ARGS)
    assert (warmup.diff() > 0).all()


@pytest.mark.parametrize(
    ("schedule", "middle", "end"),
    [
        ("constant", PEAK, PEAK),
        ("linear", (PEAK + FLOOR) / 2, FLOOR),
        ("cosine", (PEAK + FLOOR) / 2, FLOOR),
        ("wsd", PEAK, FLOOR),  # the middle of the run is in the stable phase
    ],
)
def test_middle_and_end_values(schedule, middle, end):
    middle_step = (WARMUP + TOTAL) // 2
    assert lr_at(middle_step, schedule) == pytest.approx(middle, rel=1e-5)
    assert lr_at(TOTAL, schedule) == pytest.approx(end, rel=1e-6)
    assert lr_at(TOTAL + 1000, schedule) == pytest.approx(end, rel=1e-6)


def test_cosine_quarter_point_and_linear_shape():
    quarter = WARMUP + (TOTAL - WARMUP) // 4
    expected = FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(quarter, "cosine") == pytest.approx(expected, rel=1e-5)
    assert lr_at(quarter, "linear") == pytest.approx(PEAK - (PEAK - FLOOR) / 4, rel=1e-5)


def test_wsd_decays_over_the_last_fraction():
    decay_steps = int(0.2 * TOTAL)  # 22
    start = TOTAL - decay_steps
    assert lr_at(start, "wsd") == pytest.approx(PEAK)
    assert lr_at(start + decay_steps // 2, "wsd") == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)
    assert lr_at(start - 1, "wsd") == pytest.approx(PEAK)
    assert lr_at(start + 1, "wsd") < PEAK
    # decay_fraction=0.4: the last 44 of 110 steps decay, from step 66; halfway at step 88
    assert lr_at(66, "wsd", decay_fraction=0.4) == pytest.approx(PEAK)
    assert lr_at(88, "wsd", decay_fraction=0.4) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)


@given(
    schedule=st.sampled_from(SCHEDULES),
    warmup=st.integers(0, 50),
    decay_span=st.integers(1, 300),
    floor_ratio=st.floats(0.0, 1.0),
    decay_fraction=st.floats(0.01, 1.0),
)
def test_after_warmup_never_below_floor_and_never_increasing(
    schedule, warmup, decay_span, floor_ratio, decay_fraction
):
    total = warmup + decay_span
    args = {
        "peak_lr": PEAK,
        "min_lr": PEAK * floor_ratio,
        "warmup_steps": warmup,
        "total_steps": total,
        "decay_fraction": decay_fraction,
    }
    lrs = learning_rate(torch.arange(total + 20), schedule=schedule, **args).double()
    after = lrs[warmup:]
    assert after[0].item() == pytest.approx(PEAK)
    assert (after >= args["min_lr"] * (1 - 1e-6)).all()
    assert (after <= PEAK * (1 + 1e-6)).all()
    assert (after.diff() <= 1e-12).all()
    end = PEAK if schedule == "constant" else args["min_lr"]
    assert lrs[total].item() == pytest.approx(end, rel=1e-5, abs=1e-12)


def test_no_warmup_starts_at_peak():
    for schedule in SCHEDULES:
        assert lr_at(0, schedule, warmup_steps=0) == pytest.approx(PEAK)


def test_accepts_long_and_float_steps_and_returns_float32():
    long_lr = learning_rate(torch.tensor(30), schedule="cosine", **ARGS)
    float_lr = learning_rate(torch.tensor(30.0), schedule="cosine", **ARGS)
    assert long_lr.dtype == torch.float32 and long_lr.shape == ()
    assert long_lr.item() == float_lr.item()


@pytest.mark.parametrize(
    ("schedule", "backend"),
    [
        pytest.param("cosine", "inductor", marks=pytest.mark.slow),
        ("cosine", "eager"),
        ("constant", "eager"),
        ("linear", "eager"),
        ("wsd", "eager"),
    ],
)
def test_compiles_once_for_every_step(schedule, backend):
    """fullgraph; new step values reuse the graph (guards are the same for every backend)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)

    def schedule_fn(step):
        return learning_rate(step, schedule=schedule, **ARGS)

    compiled = torch.compile(schedule_fn, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in [0, 5, WARMUP, 57, TOTAL, TOTAL + 7]:
            got = compiled(torch.tensor(step))
            torch.testing.assert_close(got, schedule_fn(torch.tensor(step)), rtol=1e-6, atol=0)
    assert counter.frame_count == 1


def test_from_config_matches_direct_call():
    cfg = OptimConfig(lr=2e-3, min_lr=2e-4, schedule="wsd", warmup_steps=5, decay_fraction=0.3)
    schedule = lr_schedule_from_config(cfg, total_steps=50)
    steps = torch.arange(60)
    expected = learning_rate(
        steps,
        schedule="wsd",
        peak_lr=2e-3,
        min_lr=2e-4,
        warmup_steps=5,
        total_steps=50,
        decay_fraction=0.3,
    )
    assert torch.equal(schedule(steps), expected)
    assert schedule(torch.tensor(50)).item() == pytest.approx(2e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"schedule": "exp"}, r"schedule='exp' is invalid: expected one of constant, linear"),
        ({"min_lr": 1.0}, r"min_lr=1.0 is invalid"),
        ({"warmup_steps": -1}, r"warmup_steps=-1 is invalid"),
        ({"total_steps": 0}, r"total_steps=0 is invalid"),
        ({"decay_fraction": 0.0}, r"decay_fraction=0.0 is invalid"),
    ],
)
def test_bad_arguments_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        learning_rate(torch.tensor(0), **{"schedule": "cosine", **ARGS, **overrides})


def test_bad_config_names_the_config_key():
    with pytest.raises(ValueError, match=r"optim.schedule='step' is invalid"):
        lr_schedule_from_config(OptimConfig(schedule="step"), total_steps=10)
    with pytest.raises(ValueError, match=r"optim.min_lr=1.0 is invalid"):
        lr_schedule_from_config(OptimConfig(lr=0.1, min_lr=1.0), total_steps=10)
    with pytest.raises(ValueError, match=r"total_steps=0 is invalid"):
        lr_schedule_from_config(OptimConfig(), total_steps=0)
