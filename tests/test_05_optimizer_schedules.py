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


def test_polar_express_coefficients_are_the_greedy_minimax_quintics():
    """The trainer's POLAR_EXPRESS_COEFFICIENTS are what tools/polar_express.py computes (Remez exchange per step),
    and each step's error 1 - p equioscillates (four alternating extrema of equal size, the minimax certificate)."""
    import sys
    import numpy as np
    from conftest import REPO
    sys.path.insert(0, str(REPO / "tools"))
    import polar_express
    computed, (low, high) = polar_express.polar_express()
    assert np.allclose(np.array(computed), np.array(train_gpt.POLAR_EXPRESS_COEFFICIENTS), rtol=1e-12)
    assert 0.81 < low and high < 1.17
    (a, b, c), error = polar_express.minimax_quintic(1e-3, 1.05)
    extrema = polar_express.extrema((a, b, c), 1e-3, 1.05)
    deviations = [1 - polar_express.quintic((a, b, c), x) for x in extrema]
    assert len(deviations) == 4 and np.allclose(np.abs(deviations), error, rtol=1e-9)
    assert all(d1 * d2 < 0 for d1, d2 in zip(deviations, deviations[1:]))


def test_polar_express_orthogonalizes_small_singular_values_the_quintic_leaves_behind_and_stays_stable_in_bf16():
    """Updates whose singular values span 1 down to 3e-3 (bf16, 64 and 128 wide, 10 seeds): five Polar Express steps
    bring every singular value into [0.7, 1.2], where the fixed quintic leaves the smallest below 0.5."""
    polar, quintic = [], []
    for seed in range(10):
        torch.manual_seed(seed)
        n = 64 if seed % 2 else 128
        u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        g = (u @ torch.diag(torch.logspace(0, -2.5, n, dtype=torch.float64)) @ v.T).float()
        polar.append(torch.linalg.svdvals(train_gpt.newton_schulz5(g, 5, coefficients=train_gpt.POLAR_EXPRESS_COEFFICIENTS).double()))
        quintic.append(torch.linalg.svdvals(train_gpt.newton_schulz5(g, 5).double()))
    polar, quintic = torch.cat(polar), torch.cat(quintic)
    assert polar.min() > 0.7 and polar.max() < 1.2, (polar.min(), polar.max())
    assert quintic.min() < 0.5


def test_min_lr_floor_and_weight_decay_taper():
    """MIN_LR_FRACTION: the warm-down ends at the floor, not 0; WD_TAPER_START_FRACTION: weight decay is 1x until it,
    then falls linearly to 0 at the end (1 = off)."""
    assert train_gpt.lr_scale(1.0, 0.02, 0.4, 0.1) == pytest.approx(0.1)
    assert train_gpt.lr_scale(0.8, 0.02, 0.4, 0.1) == pytest.approx(0.55)
    assert train_gpt.weight_decay_scale(0.5, 0.8) == 1.0 and train_gpt.weight_decay_scale(0.9, 0.8) == pytest.approx(0.5)
    assert train_gpt.weight_decay_scale(1.0, 0.8) == 0.0 and train_gpt.weight_decay_scale(0.99, 1.0) == 1.0


def test_train_step_applies_the_taper_and_the_coefficients():
    """train_step sets each group's weight decay to its base times the taper; Muon groups carry the configured
    Newton-Schulz coefficients."""
    from conftest import tiny_config, tiny_model
    config = tiny_config(MUON_WD=0.1, WD_TAPER_START_FRACTION=0.5, MUON_NS_COEFFICIENTS="polar_express", GRAD_ACCUM_STEPS=1)
    model = tiny_model()
    optimizers = train_gpt.build_optimizers(model, config.train, fused=False)
    muon = next(o for o in optimizers if isinstance(o, train_gpt.Muon))
    assert muon.param_groups[0]["coefficients"] == train_gpt.POLAR_EXPRESS_COEFFICIENTS

    class Loader:
        def next_batch(self, tokens, seq_len):
            x = torch.randint(0, 1024, (tokens // seq_len, seq_len))
            return x, x

    train_gpt.train_step(model, optimizers, Loader(), config.train, 64, train_gpt.Dist(), 1, 0, 0.75)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.05)
