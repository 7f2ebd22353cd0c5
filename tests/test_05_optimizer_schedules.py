"""OPTIMIZER + SCHEDULES."""
import pytest
import torch

import train_gpt


def test_muon_update_is_orthogonalized():
    """Newton-Schulz output has singular values near 1 (the quintic's band is about 0.7..1.2)."""
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32), (48, 48)]:
        s = torch.linalg.svdvals(train_gpt.newton_schulz5(torch.randn(shape), 5).float())
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())


def test_muon_step_applies_an_orthogonalized_update_with_the_shape_scale():
    """One Muon.step from an ill-conditioned gradient (singular values 1..0.1): (p_before - p_after) / lr divided by
    sqrt(max(1, rows/cols)) has singular values in the quintic's band 0.6..1.3 (the normalized gradient's are
    0.03..0.37), with and without row equilibration, for wide, tall and square matrices."""
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32), (48, 48)]:
        rows, cols = shape
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(rows, k))
        v, _ = torch.linalg.qr(torch.randn(cols, k))
        grad = u @ torch.diag(torch.logspace(0, -1, k)) @ v.T
        normalized = torch.linalg.svdvals(grad / grad.norm())
        assert normalized.max() < 0.5  # a plain normalized step would fail the band below
        for row_equilibrate in (0, 1):
            p = torch.nn.Parameter(torch.zeros(shape))
            opt = train_gpt.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, row_equilibrate=row_equilibrate, weight_decay=0.0)
            p.grad = grad.clone()
            opt.step()
            step = (0.0 - p.detach()) / 0.1 / max(1.0, rows / cols) ** 0.5
            s = torch.linalg.svdvals(step)
            assert s.min() > 0.6 and s.max() < 1.3, (shape, row_equilibrate, s.min(), s.max())


def test_muon_weight_decay_only_touches_params_with_gradient():
    """A matrix with a zero gradient neither decays nor moves; one with a gradient does both."""
    a, b = torch.nn.Parameter(torch.ones(4, 8)), torch.nn.Parameter(torch.ones(4, 8))
    opt = train_gpt.Muon([a, b], lr=0.1, momentum=0.9, backend_steps=5, row_equilibrate=1, weight_decay=0.5)
    a.grad, b.grad = torch.randn(4, 8), torch.zeros(4, 8)
    opt.step()
    assert not torch.equal(a.data, torch.ones(4, 8))
    assert torch.equal(b.data, torch.ones(4, 8))


def test_lr_schedule_is_a_function_of_the_budget_fraction():
    """Warm-up ramps to 1, the middle is 1, warm-down reaches 0 at the end of the budget."""
    f = train_gpt.lr_scale
    assert f(0.01, 0.02, 0.4) == 0.5
    assert f(0.3, 0.02, 0.4) == 1.0
    assert abs(f(0.8, 0.02, 0.4) - 0.5) < 1e-9
    assert f(1.0, 0.02, 0.4) == 0.0


def test_muon_momentum_warmup():
    """Momentum ramps linearly from start to end."""
    assert train_gpt.muon_momentum(0, 0.85, 0.95, 100) == 0.85
    assert abs(train_gpt.muon_momentum(50, 0.85, 0.95, 100) - 0.90) < 1e-12
    assert train_gpt.muon_momentum(500, 0.85, 0.95, 100) == 0.95


def test_ema_starts_from_live_weights_and_applies_once():
    """The shadow is a copy of the live weights at the start fraction; a step that advances the fraction by df
    moves it by 1 - exp(-df / horizon) towards the live weights; applying twice is refused."""
    import math
    import pytest
    model = torch.nn.Linear(3, 3)
    ema = train_gpt.EMA(0.1 / math.log(2), start_fraction=0.5)  # df = 0.1 halves the distance
    ema.update(model, 0.4)
    assert ema.shadow is None
    ema.update(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model, 0.6)
    ema.apply_to(model)
    assert torch.allclose(model.weight, start + 1.0)
    with pytest.raises(RuntimeError):
        ema.apply_to(model)


def test_ema_horizon_is_a_fraction_of_the_run_not_a_step_count():
    """Over the same span of the run, 10 steps and 1,000 steps leave the starting weights the same share of the
    shadow, exp(-span / horizon): the EMA means the same at 400 steps as at 7,000."""
    import math
    shares = []
    for steps in (10, 1000):
        model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema = train_gpt.EMA(0.05, start_fraction=0.5)
        ema.update(model, 0.5)
        with torch.no_grad():
            model.weight.fill_(0.0)  # live weights 0 from here on: the shadow is the starting weights' share
        for k in range(1, steps + 1):
            ema.update(model, 0.5 + 0.5 * k / steps)
        shares.append(float(ema.shadow[0]))
    assert shares[0] == pytest.approx(math.exp(-0.5 / 0.05), rel=1e-4)
    assert shares[1] == pytest.approx(shares[0], rel=1e-4)


def test_train_budget_keeps_the_reserve_for_post_loop_train_reads():
    """The loop gets MAX_WALLCLOCK_SECONDS minus the reserve of the post-loop work that reads train data (automatic:
    CALIB_MAX_SECONDS when calibrating + the temperature fit's allowance), and the schedules run over the loop's
    budget: the LR warm-down ends when the loop ends, not later."""
    from conftest import tiny_config
    plain = train_gpt.train_budget(tiny_config(MAX_WALLCLOCK_SECONDS=100))
    assert (plain.loop_seconds, plain.reserve_seconds) == (100, 0)
    budget = train_gpt.train_budget(tiny_config(MAX_WALLCLOCK_SECONDS=100, TERNARY_SCALE_SEARCH=1, CALIB_MAX_SECONDS=30, TEMP_SCALING=1))
    assert budget.reserve_seconds == 30 + train_gpt.TEMPERATURE_FIT_RESERVE_S and budget.loop_seconds == 100 - budget.reserve_seconds
    assert budget.fraction(0, budget.loop_seconds) == 1.0 and budget.done(5, budget.loop_seconds)
    assert train_gpt.lr_scale(budget.fraction(0, budget.loop_seconds), 0.02, 0.4) == 0.0
    explicit = train_gpt.train_budget(tiny_config(MAX_WALLCLOCK_SECONDS=100, TEMP_SCALING=1, TRAIN_DATA_RESERVE_SECONDS=5))
    assert explicit.loop_seconds == 95
    steps = train_gpt.train_budget(tiny_config(ITERATIONS=40))
    assert steps.fraction(10, 1e9) == 0.25 and steps.done(40, 0.0) and not steps.done(39, 1e9)
    with pytest.raises(train_gpt.ConfigError, match="TRAIN_DATA_RESERVE_SECONDS"):
        train_gpt.train_budget(tiny_config(MAX_WALLCLOCK_SECONDS=10, TEMP_SCALING=1, TRAIN_DATA_RESERVE_SECONDS=20))


def test_mfu_divides_by_the_h100_spec_peak():
    """MFU's denominator is NVIDIA's H100 SXM dense bf16 figure, 989 TFLOP/s (a datasheet number, not a measurement)."""
    assert train_gpt.H100_BF16_PEAK_FLOPS == 989e12
