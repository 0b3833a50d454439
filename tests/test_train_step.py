"""The compiled train step: compile == eager, accumulation, non-finite handling, fp16 scaling."""

import dataclasses

import pytest
import torch

from llmfn.config import from_dict
from llmfn.optim import build_optimizer
from llmfn.schedule import lr_schedule_from_config
from llmfn.step import (
    FP16_GROWTH_INTERVAL,
    init_train_state,
    is_scale_overflow,
    make_eval_step,
    make_train_step,
    next_loss_scale,
)
from llmfn.tasks import get_task
from tests.step_fixtures import global_batch, small_config, state_and_step


def run_steps(step, state, config, steps: int, *, rows: int = 2, accum: int = 1):
    losses = []
    for i in range(steps):
        state, metrics = step(state, global_batch(config, i, rows=rows, accum=accum))
        losses.append(float(metrics["loss"]))
    return state, losses


def assert_trees_close(a, b, **tol):
    for key, leaf in a.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(leaf, b[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module", params=["compile=True", "torch.compile(train_step)"])
def compiled_run(request):
    """5 steps compiled the trainer's way (the arithmetic on leaves, trees outside the graph)
    and by compiling the whole train_step, trees included."""
    config = small_config()
    if request.param == "compile=True":
        state, step = state_and_step(config, compile=True)
    else:
        state, step = state_and_step(config)
        step = torch.compile(step, fullgraph=True)
    return run_steps(step, state, config, 5)


def test_compiled_step_equals_eager(compiled_run):
    config = small_config()
    state, step = state_and_step(config)
    eager_state, eager_losses = run_steps(step, state, config, 5)
    compiled_state, compiled_losses = compiled_run
    torch.testing.assert_close(
        torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5
    )
    assert_trees_close(compiled_state["params"], eager_state["params"], rtol=1e-4, atol=1e-5)
    assert int(compiled_state["step"]) == 5
    assert eager_losses[-1] < eager_losses[0]


def test_step_does_not_mutate_its_input_state():
    config = small_config()
    state, step = state_and_step(config)
    before = state.clone()
    step(state, global_batch(config, 0, rows=2))
    assert_trees_close(state, before, rtol=0, atol=0)


@pytest.mark.parametrize("donate", [False, True])
def test_compiled_step_does_not_recompile_across_steps(donate):
    config = small_config()
    state, compiled = state_and_step(config, compile=True, donate=donate)
    state, _ = compiled(state, global_batch(config, 0, rows=2))
    torch._dynamo.config.error_on_recompile = True
    try:
        run_steps(compiled, state, config, 3)
    finally:
        torch._dynamo.config.error_on_recompile = False


@pytest.mark.parametrize("compile", [False, True])
def test_donating_step_updates_in_place_with_the_same_values(compile):
    config = small_config()
    state, step = state_and_step(config, compile=compile)
    donor, donating = state_and_step(config, compile=compile, donate=True)
    leaf = ("params", "layers", "0", "attn", "wqkv")
    buffers = {key: donor[key].data_ptr() for key in [leaf, ("opt_state", "exp_avg", *leaf[1:])]}
    for i in range(3):
        batch = global_batch(config, i, rows=2)
        state, metrics = step(state, batch)
        donor, donated_metrics = donating(donor, batch)
        torch.testing.assert_close(donated_metrics["loss"], metrics["loss"])
    assert_trees_close(donor, state, rtol=1e-5, atol=1e-7)  # compiled: fusions may round apart
    assert {key: donor[key].data_ptr() for key in buffers} == buffers  # written in place


def test_compiled_eval_step_equals_eager_without_recompiling():
    config = small_config()
    state, _ = state_and_step(config)
    eager, compiled = (make_eval_step(get_task("lm"), config, compile=c) for c in (False, True))
    batches = [{k: v[0] for k, v in global_batch(config, i, rows=2).items()} for i in range(3)]
    compiled(state["params"], batches[0])
    torch._dynamo.config.error_on_recompile = True
    try:
        for batch in batches:
            want, got = eager(state["params"], batch), compiled(state["params"], batch)
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
            assert int(got["tokens"]) == int(want["tokens"]) == 2 * 16
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_gradient_accumulation_equals_one_big_batch():
    config = small_config()
    state, step = state_and_step(config)
    big = global_batch(config, 0, rows=4)
    halves = {k: v.view(2, 2, -1) for k, v in big.items()}
    accum_config = small_config(grad_accum_steps=2)
    state2, step2 = state_and_step(accum_config)
    one, m1 = step(state, big)
    two, m2 = step2(state2, halves)
    assert_trees_close(one["params"], two["params"], rtol=1e-4, atol=1e-5)  # Adam step 1 ~ sign(g)
    torch.testing.assert_close(m1["loss"], m2["loss"])
    assert float(m2["tokens"]) == float(m1["tokens"]) == 4 * 16


def test_accumulation_weighs_every_loss_token_alike():
    """Micro-batches with different numbers of loss tokens (masked prompts) step as the whole
    batch in one piece: the mean over all its tokens, not the mean of the micro-batches' means;
    each row drops the same units either way. SGD without momentum or clipping, so the params
    move by exactly lr x gradient."""
    sgd = {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0, "grad_clip": None}
    whole, split = (
        config.replace(optim=dataclasses.replace(config.optim, **sgd))
        for config in (small_config(0.2), small_config(0.2, grad_accum_steps=2))
    )
    big = global_batch(whole, 0, rows=4, prompts=True)
    halves = {k: v.view(2, 2, -1) for k, v in big.items()}
    counts = (halves["targets"] != -100).sum(dim=(1, 2))
    assert counts[0] != counts[1]  # the case under test
    (one, m1), (two, m2) = (
        step(state, batch)
        for (state, step), batch in ((state_and_step(whole), big), (state_and_step(split), halves))
    )
    assert_trees_close(one["params"], two["params"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m1["loss"], m2["loss"])
    torch.testing.assert_close(m1["grad_norm"], m2["grad_norm"])
    assert int(m1["tokens"]) == int(m2["tokens"]) == int(counts.sum())


def test_nonfinite_update_is_skipped_and_counted():
    config = small_config()
    state, step = state_and_step(config)
    poisoned = state.clone()
    poisoned["params", "layers", "0", "attn", "wo"][0, 0] = float("nan")
    new_state, metrics = step(poisoned, global_batch(config, 0, rows=2))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(new_state["nonfinite_streak"]) == 1
    assert_trees_close(new_state["opt_state"], poisoned["opt_state"], rtol=0, atol=0)
    embed = new_state["params", "embed", "weight"]
    assert torch.equal(embed, poisoned["params", "embed", "weight"])  # nothing moved
    healthy, metrics = step(state, global_batch(config, 0, rows=2))
    assert float(metrics["nonfinite"]) == 0.0 and int(healthy["nonfinite_streak"]) == 0


def test_fp16_loss_scale_halves_on_overflow_and_grows_after_a_run():
    scale, good = torch.tensor(1024.0), torch.tensor(5)
    s, g = next_loss_scale(scale, good, torch.tensor(False))
    assert float(s) == 512.0 and int(g) == 0
    s, g = next_loss_scale(scale, good, torch.tensor(True))
    assert float(s) == 1024.0 and int(g) == 6
    s, g = next_loss_scale(scale, torch.tensor(FP16_GROWTH_INTERVAL - 1), torch.tensor(True))
    assert float(s) == 2048.0 and int(g) == 0


def test_metrics_are_tensors_with_lr_from_schedule():
    config = small_config()
    state, step = state_and_step(config)
    _, metrics = step(state, global_batch(config, 0, rows=2))
    assert {"loss", "grad_norm", "lr", "tokens", "nonfinite", "skipped", "ce_loss"} <= set(metrics)
    assert (float(metrics["nonfinite"]), float(metrics["skipped"])) == (0.0, 0.0)
    assert all(isinstance(v, torch.Tensor) for v in metrics.values())
    assert 0 < float(metrics["lr"]) < config.optim.lr  # still warming up at step 0


def test_a_skipped_step_is_not_applied_and_leaves_the_bias_correction_alone():
    """A non-finite step, then three good ones, ends where the three good ones alone end (AdamW
    at a constant lr: torch's AdamW with GradScaler skipping optimizer.step() does the same).
    The step counter still counts it: it drives the lr schedule and the data."""
    config = from_dict(
        {
            "model": {"hidden_size": 16, "num_layers": 1},
            "data": {"module": "regression", "regression_features": 4},
            "optim": {"schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0},
            "train": {"task": "regression", "max_steps": 10},
        }
    )
    gen = torch.Generator().manual_seed(0)
    good = [{"x": torch.randn(1, 8, 4, generator=gen), "y": torch.randn(1, 8, 1, generator=gen)}]
    good += [{k: torch.randn(v.shape, generator=gen) for k, v in good[0].items()} for _ in range(2)]
    nan = {"x": torch.full((1, 8, 4), float("nan")), "y": torch.zeros(1, 8, 1)}
    task = get_task("regression")
    params = task.init_params(config, 0)
    optimizer = build_optimizer(config.optim, params)
    state = init_train_state(params, optimizer, seed=0, precision="fp32")
    step = make_train_step(task, config, optimizer, lr_schedule_from_config(config.optim, 10))
    straight = skipping = state
    for batch in good:
        straight, _ = step(straight, batch)
    skipping, metrics = step(skipping, nan)
    assert float(metrics["nonfinite"]) == 1.0
    for batch in good:
        skipping, _ = step(skipping, batch)
    assert_trees_close(skipping["params"], straight["params"], rtol=0, atol=1e-6)
    assert_trees_close(skipping["opt_state"], straight["opt_state"], rtol=0, atol=1e-6)
    assert (int(skipping["step"]), int(skipping["updates"])) == (4, 3)
    assert int(straight["step"]) == int(straight["updates"]) == 3


def fp16_state_and_step(nonfinite: str = "halt"):
    config = small_config(precision="fp16", nonfinite=nonfinite)
    return config, *state_and_step(config)


def test_an_fp16_overflow_backs_off_the_scale_without_counting_as_a_failure():
    """GradScaler's rule: scaled gradients that overflow (a finite loss) halve the scale and
    skip the update; that is no non-finite failure, even under train.nonfinite=halt."""
    config, state, step = fp16_state_and_step("halt")
    state["loss_scale"] = torch.tensor(2.0**40)  # overflows any fp16 gradient
    batch = global_batch(config, 0, rows=2)
    after, metrics = step(state, batch)
    assert torch.isfinite(metrics["loss"]) and not torch.isfinite(metrics["grad_norm"])
    assert float(after["loss_scale"]) == 2.0**39
    assert int(after["nonfinite_streak"]) == 0  # the state is not frozen: training goes on
    assert (int(after["step"]), int(after["updates"])) == (1, 0)
    assert (float(metrics["nonfinite"]), float(metrics["skipped"])) == (0.0, 1.0)
    assert_trees_close(after["params"], state["params"], rtol=0, atol=0)
    after["loss_scale"] = torch.tensor(2.0**10)
    trained, metrics = step(after, batch)
    assert float(metrics["nonfinite"]) == 0.0 and int(trained["updates"]) == 1
    assert not torch.equal(trained["params", "embed", "weight"], state["params", "embed", "weight"])


def test_an_fp16_overflow_leaves_the_failure_streak_as_it_is():
    """Between two failures an overflow neither resets the streak (alternating failures and
    overflows would never reach the limit) nor adds to it."""
    config, state, step = fp16_state_and_step("skip")
    state["loss_scale"] = torch.tensor(2.0**40)
    state["nonfinite_streak"] = torch.tensor(2)
    after, _ = step(state, global_batch(config, 0, rows=2))
    assert int(after["nonfinite_streak"]) == 2 and int(after["updates"]) == 0


def test_an_fp16_non_finite_loss_still_counts_as_a_failure():
    config, state, step = fp16_state_and_step("halt")
    state["params", "layers", "0", "attn", "wo"][0, 0] = float("nan")
    after, metrics = step(state, global_batch(config, 0, rows=2))
    assert not torch.isfinite(metrics["loss"])
    assert int(after["nonfinite_streak"]) == 1


def test_only_a_finite_loss_with_overflowing_gradients_above_scale_1_is_a_scale_overflow():
    inf, finite = torch.tensor(float("inf")), torch.tensor(3.0)
    assert is_scale_overflow(finite, inf, torch.tensor(1024.0))
    assert not is_scale_overflow(finite, inf, torch.tensor(1.0))  # unscaled gradients overflow
    assert not is_scale_overflow(inf, inf, torch.tensor(1024.0))  # the loss itself
    assert not is_scale_overflow(finite, finite, torch.tensor(1024.0))  # nothing overflowed
