"""MODEL: ADD-ONS: engram hash, capsule bank (Koopman, carry), feedback adapters, MoE: causal, exact reload,
aux losses at the right scale, idle experts frozen (their DDP run is in test_08_train_distributed.py)."""
import pytest
import torch

import train_gpt
from conftest import assert_causal, eval_context, perturbed_model, stage, tiny_config, tiny_model

OPTIONS = {
    "engram": dict(BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64, BIGRAM_HASH_DIM=16, ENGRAM_NUM_ORDERS=3, ENGRAM_INJECT_LAYER=1),
    "capsule": dict(CAPSULE_ENABLED=1, CAPSULE_NUM=4, CAPSULE_DIM=16, CAPSULE_KOOPMAN_RANK=2, KOOPMAN_SPECULATIVE_STEPS=2),
    "capsule_halting": dict(CAPSULE_ENABLED=1, CAPSULE_NUM=4, CAPSULE_DIM=16, KOOPMAN_SPECULATIVE_STEPS=3, KOOPMAN_HALT_THRESHOLD=0.05),
    "feedback": dict(FEEDBACK_ENABLED=1, FEEDBACK_PASSES=2),
    "moe": dict(MOE_ENABLED=1, MOE_NUM_EXPERTS=3, MOE_TOP_K=2, MOE_START_FRACTION=0.5),
    "all": dict(BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64, CAPSULE_ENABLED=1, CAPSULE_NUM=4, FEEDBACK_ENABLED=1, MOE_ENABLED=1),
}


TRAINABLE = sorted(set(OPTIONS) - {"capsule_halting"})  # halting only changes the forward: causal test below


@pytest.mark.parametrize("name", TRAINABLE)
def test_option_runs_forward_backward_and_every_param_gets_a_route(name):
    """Each option trains a step on CPU: finite loss, every parameter in exactly one optimizer group."""
    model = tiny_model(**OPTIONS[name])
    optimizers = train_gpt.build_optimizers(model, tiny_config(**OPTIONS[name]).train, fused=False)
    grouped = [id(p) for o in optimizers for g in o.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    x = torch.randint(0, 1024, (2, 32))
    loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    for opt in optimizers:
        opt.step()
    model.post_step()


@pytest.mark.parametrize("name", TRAINABLE + ["feedback_one_pass"])
def test_every_parameter_of_an_addon_gets_a_gradient(name):
    """DDP refuses parameters that get no gradient: every add-on parameter, in every pass count, is used."""
    config = OPTIONS.get(name, dict(FEEDBACK_ENABLED=1))
    model = perturbed_model(**config)
    model.train()
    x = torch.randint(0, 1024, (2, 32))
    model(x, x).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_is_causal(name):
    """Perturbing tokens after t leaves logits <= t unchanged, for every add-on (n-gram hash and capsules included)."""
    assert_causal(perturbed_model(**OPTIONS[name]).eval())


def test_engram_rows_use_only_current_and_previous_tokens():
    """Row ids at t depend on tokens t-order..t; no history or a crossed BOS gives the reserved row 0 of the table."""
    ids = torch.tensor([[5, 7, 9, train_gpt.BOS_ID, 11, 13, 15]])
    rows = train_gpt.engram_rows(ids, 3, 2, 64)  # tables: bigram h0, h1, trigram h0, h1, 4-gram h0, h1
    bucket = rows % 64
    assert (rows // 64 == torch.arange(6)).all()
    assert (bucket[0, 0] == 0).all() and (bucket[0, 1, :2] > 0).all() and (bucket[0, 1, 2:] == 0).all()
    assert (bucket[0, 3] == 0).all()                       # (9, BOS) crosses into a new document
    assert (bucket[0, 4, :2] > 0).all() and (bucket[0, 4, 2:] == 0).all()  # (BOS, 11) is fine; (9, BOS, 11) is not
    assert (bucket[0, 6] > 0).all()
    later = ids.clone()
    later[0, 5:] = 3
    assert torch.equal(train_gpt.engram_rows(later, 3, 2, 64)[:, :5], rows[:, :5])
    assert rows[0, 6, 0] != rows[0, 6, 1]                 # distinct primes per head


def test_engram_tables_have_distinct_prime_multipliers():
    """Every (order, head) table hashes with its own prime, enough for the largest allowed config."""
    primes = train_gpt.ENGRAM_PRIMES
    assert len(set(primes)) == len(primes) >= 3 * 4
    assert all(all(p % d for d in range(2, int(p ** 0.5) + 1)) for p in primes)


def test_engram_row_hits_count_every_lookup():
    """count_row_hits sums to positions * tables and matches a direct count of the row ids."""
    model = tiny_model(**OPTIONS["engram"])
    ids = torch.randint(0, 1024, (3, 40))
    hits = model.engram.count_row_hits(ids)
    rows = model.engram.rows(ids)
    assert hits.dtype == torch.long and hits.shape == (model.engram.tables.weight.size(0),)
    assert hits.sum() == ids.numel() * rows.size(-1)
    assert hits[int(rows[1, 7, 2])] == (rows == rows[1, 7, 2]).sum()
    assert getattr(model.engram.tables.weight, "ttt_group", None) == "engram"


def _used_gate_scale(engram, x, ids):
    """The gate scale EngramHash.forward used, read back from its output: gate = out / value (per position) and
    logit(gate) = scale * cos(x, key) + bias, with value / key captured from the module's own projections."""
    seen = {}
    hooks = [getattr(engram, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
             for name in ("value", "key")]
    with torch.no_grad():
        out = engram(x, ids)
    for hook in hooks:
        hook.remove()
    value, key = seen["value"].double(), seen["key"].double()
    gate = (out.double() * value).sum(-1) / value.square().sum(-1)
    cos = torch.nn.functional.cosine_similarity(x.double(), key, dim=-1)
    usable = cos.abs() > 0.05
    assert usable.sum() > 20
    return ((torch.logit(gate) - float(engram.gate_bias.detach())) / cos)[usable]


def test_engram_gate_scale_stays_in_range():
    """The scale the engram gate actually applies is in [0.1, 4] at any parameter value (0.1 / 4 at saturation)."""
    engram = perturbed_model(**OPTIONS["engram"]).engram
    torch.manual_seed(5)
    x, ids = torch.randn(2, 24, 64), torch.randint(0, 1024, (2, 24))
    scales = {}
    for value in (-50.0, 0.0, 50.0):
        with torch.no_grad():
            engram.gate_scale.fill_(value)
        used = _used_gate_scale(engram, x, ids)
        assert float(used.max() - used.min()) < 1e-3, "one scalar scale for every position"
        scales[value] = float(used.median())
        assert 0.1 - 1e-3 <= scales[value] <= 4.0 + 1e-3, (value, scales[value])
    assert scales[-50.0] == pytest.approx(0.1, abs=1e-3) and scales[50.0] == pytest.approx(4.0, abs=1e-3)
    assert scales[-50.0] < scales[0.0] < scales[50.0]


def test_training_forward_equals_eval_nll_with_every_addon():
    """No train/eval difference: with every add-on (no dropout-like option) train-mode hidden states and per-token
    NLL are bit-equal to eval mode, and with aux weights 0 the training loss is the mean eval NLL (progress 1)."""
    model = perturbed_model(**OPTIONS["all"], KOOPMAN_CONSISTENCY_WEIGHT=0, MOE_AUX_WEIGHT=0, KOOPMAN_SPECULATIVE_STEPS=2,
                            KOOPMAN_HALT_THRESHOLD=0.05, FEEDBACK_PASSES=2)
    x, y = torch.randint(0, 1024, (2, 32)), torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        train_hidden, train_nll, train_loss = model.train().hidden(x)[0], model.token_nll(x, y), model(x, y)
        eval_hidden, eval_nll = model.eval().hidden(x)[0], model.token_nll(x, y)
    assert torch.equal(train_hidden, eval_hidden) and torch.equal(train_nll, eval_nll)
    assert torch.allclose(train_loss, eval_nll.mean(), atol=1e-6)


def _loss(weight_name, weight, batch, **overrides):
    model = perturbed_model(**overrides, **{weight_name: weight})
    with torch.no_grad():
        return model(*batch).double()


@pytest.mark.parametrize("weight_name, option", [("KOOPMAN_CONSISTENCY_WEIGHT", "capsule"), ("MOE_AUX_WEIGHT", "moe")])
def test_aux_loss_reaches_total_loss_with_its_weight(weight_name, option):
    """loss(w) - loss(0) = w * aux, linear in w, and the aux term is a mean (a duplicated batch gives the same)."""
    torch.manual_seed(4)
    x = torch.randint(0, 1024, (2, 32))
    batch, doubled = (x, x), (x.repeat(2, 1), x.repeat(2, 1))
    base = _loss(weight_name, 0.0, batch, **OPTIONS[option])
    aux = _loss(weight_name, 1.0, batch, **OPTIONS[option]) - base
    assert aux > 1e-6
    assert torch.allclose(_loss(weight_name, 0.3, batch, **OPTIONS[option]) - base, 0.3 * aux, rtol=1e-4)
    doubled_aux = _loss(weight_name, 1.0, doubled, **OPTIONS[option]) - _loss(weight_name, 0.0, doubled, **OPTIONS[option])
    assert torch.allclose(doubled_aux, aux, rtol=1e-4)


def test_capsule_consistency_loss_trains_only_the_predictor():
    """The consistency term's gradient reaches the predictor (diag, left, right) and nothing upstream of the pooled
    states: with the input state attached, a contractive predictor pulled the states (and the loss) up every step."""
    model = perturbed_model(**dict(OPTIONS["capsule"], KOOPMAN_CONSISTENCY_WEIGHT=1.0))
    bank = model.capsules
    x = torch.randn(2, 32, 64, requires_grad=True)
    state, _, _ = bank.pool(x, None)
    bank.consistency_loss(state).backward()
    assert x.grad is None or not x.grad.any()
    assert bank.value.weight.grad is None and bank.assign.weight.grad is None
    assert all(p.grad is not None and p.grad.any() for p in (bank.diag, bank.left, bank.right))


def test_capsule_consistency_loss_is_scale_free():
    """States 10 times larger (their scale follows the residual stream's, which grows in training) give the same
    consistency loss: it is the prediction error relative to the target states' power."""
    bank = perturbed_model(**OPTIONS["capsule"]).capsules
    with torch.no_grad():
        state = bank.pool(torch.randn(2, 32, 64), None)[0]
        small, large = (bank.consistency_loss(scale * state) for scale in (1.0, 10.0))
    assert float(small) > 0 and torch.allclose(small, large, rtol=1e-4)


def test_moe_balance_loss_matches_switch_formula():
    """The MoE aux term equals E * sum_e f_e P_e computed independently from the router's input."""
    model = perturbed_model(**dict(OPTIONS["moe"], MOE_TOP_K=1, MOE_AUX_WEIGHT=1.0))
    seen = []
    moe = model.blocks[-1].mlp
    moe.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        _, aux = model.hidden(x)
    layers = [b.mlp for b in model.blocks if isinstance(b.mlp, train_gpt.MoEMLP)]
    assert len(layers) == len(aux) == 2 and moe is layers[-1]
    h = seen[0].reshape(-1, seen[0].size(-1))
    probs = torch.softmax(h @ moe.router.effective_weight().T, -1)
    fraction = torch.bincount(probs.argmax(-1), minlength=3).float() / len(h)
    assert torch.allclose(aux[-1], 3 * (fraction * probs.mean(0)).sum(), atol=1e-5)


def test_moe_expert_without_tokens_does_not_move():
    """Experts that got no token keep bit-identical weights after an optimizer step; the used one moves."""
    overrides = dict(MOE_ENABLED=1, MOE_NUM_EXPERTS=4, MOE_TOP_K=1, MOE_START_FRACTION=0.0, MUON_WD=0.1, ADAM_WD=0.1)
    model = perturbed_model(**overrides)
    optimizers = train_gpt.build_optimizers(model, tiny_config(**overrides).train, fused=False)
    moe = model.blocks[-1].mlp
    x = torch.full((2, 32), 17)  # one repeated token: every position has the same hidden state, so one expert
    before = [[p.detach().clone() for p in e.parameters()] for e in moe.experts]
    model(x, x).backward()
    for opt in optimizers:
        opt.step()
    moved = [not all(torch.equal(a, p) for a, p in zip(saved, e.parameters())) for saved, e in zip(before, moe.experts)]
    assert sum(moved) == 1, moved
    assert all(p.route in ("ternary", "dense") for e in moe.experts for p in e.parameters())


def test_capsule_diag_is_clamped_after_each_step():
    """post_step keeps |diag| < 0.999 whatever the optimizer did."""
    model = tiny_model(**OPTIONS["capsule"])
    with torch.no_grad():
        model.capsules.diag.copy_(torch.linspace(-3, 3, model.capsules.diag.numel()))
    model.post_step()
    assert model.capsules.diag.abs().max() < 0.999
    assert all(getattr(p, "ttt_group", None) == "capsule_bank" for p in model.capsules.parameters())


def test_speculative_steps_halt_when_the_update_is_small():
    """A position stops stepping once its update norm is below KOOPMAN_HALT_THRESHOLD; others take every step."""
    bank = tiny_model(**OPTIONS["capsule_halting"]).capsules
    z = torch.randn(2, 16) * torch.tensor([[1e-3], [10.0]])
    with torch.no_grad():
        out = bank.speculate(z)
        assert torch.equal(out[0], z[0])
        assert torch.equal(out[1], bank.predict(bank.predict(bank.predict(z[1]))))
        bank.halt_threshold = 0.0
        assert not torch.equal(bank.speculate(z)[0], z[0])


def test_zero_carry_equals_no_carry():
    """hidden_with_carry with an all-zero carry is hidden() to the bit; a nonzero carry changes the output."""
    model = perturbed_model(**OPTIONS["capsule"]).eval()
    x = torch.randint(0, 1024, (2, 24))
    with torch.no_grad():
        plain, _ = model.hidden(x)
        _, carry = model.hidden_with_carry(x, None)
        zero, _ = model.hidden_with_carry(x, torch.zeros_like(carry))
        carried, _ = model.hidden_with_carry(x, carry)
    assert carry.shape == (2, 4, 17)
    assert torch.equal(plain, zero) and not torch.allclose(plain, carried)


def _tables():
    return (torch.ones(1024, dtype=torch.long), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))


def carry_score(model, tokens, windows=None, carry_enabled=True, trace=None):
    """(NLL, bytes, targets) of the carry scorer over `windows` (default: plain windows of 64)."""
    windows = train_gpt.eval_windows(len(tokens), 64, 64) if windows is None else windows
    ctx = eval_context(model, tokens, _tables())
    return train_gpt.score_carry(ctx, [stage("capsule_carry")], windows, 1.0, trace=trace, carry_enabled=carry_enabled)[0]


def test_carry_holds_only_already_scored_windows():
    """Each window's carry was fed only by earlier, already-scored, non-overlapping windows; changing tokens of a
    later window leaves earlier window scores unchanged; with the carry off the stream equals the plain eval."""
    model = perturbed_model(**OPTIONS["capsule"]).eval()
    tokens = torch.randint(0, 1024, (300,))
    trace = []
    carried = carry_score(model, tokens, trace=trace)
    scored = []
    for (start, end), fed in trace:
        assert fed == scored and all(e <= start for _, e in fed)
        scored.append((start, end))
    assert [w for w, _ in trace] == [(s, s + n) for s, n, _ in train_gpt.eval_windows(300, 64, 64)]
    off = carry_score(model, tokens, carry_enabled=False)
    plain = train_gpt.score_windows(eval_context(model, tokens, _tables()), [stage("roundtrip")], train_gpt.eval_windows(300, 64, 64), 1.0)[0]
    assert torch.allclose(off, plain, rtol=1e-12) and not torch.allclose(carried, plain)
    first_two = train_gpt.eval_windows(300, 64, 64)[:2]
    changed = tokens.clone()
    changed[129:] = torch.randint(0, 1024, (171,))
    assert torch.equal(carry_score(model, tokens, first_two), carry_score(model, changed, first_two))


def test_carry_never_includes_the_current_window():
    """With the carry on, changing tokens after position t of window k leaves window k's NLL at positions <= t
    unchanged: the carry holds earlier windows only, never the window's own pooled state (checked through
    score_carry's per-offset sums and through GPT.hidden_with_carry's logits)."""
    model = perturbed_model(**OPTIONS["capsule"]).eval()
    torch.manual_seed(6)
    tokens, t = torch.randint(0, 1024, (200,)), 20
    changed = tokens.clone()
    changed[64 + t + 2:] = torch.randint(0, 1024, (200 - 64 - t - 2,))  # window 1 inputs and targets <= t unchanged
    def prefix_and_total(stream, carry_enabled=True):  # window 1's NLL at offsets <= t, and the whole sum
        sums = [float(carry_score(model, stream, [(0, 64, 0), (64, 64, score_from)], carry_enabled)[0]) for score_from in (0, t + 1)]
        return sums[0] - sums[1], sums[0]

    (prefix, total), (prefix_changed, total_changed) = prefix_and_total(tokens), prefix_and_total(changed)
    assert prefix == pytest.approx(prefix_changed, abs=1e-6)
    assert total != pytest.approx(total_changed, abs=1e-3)  # the change is seen after t
    assert prefix != pytest.approx(prefix_and_total(tokens, carry_enabled=False)[0], abs=1e-3)  # the carry is used
    with torch.no_grad():
        _, carry = model.hidden_with_carry(tokens[None, :64], None)
        logits = [model.logits(model.hidden_with_carry(s[None, 64:128], carry)[0]) for s in (tokens, changed)]
    assert torch.allclose(logits[0][:, :t + 1], logits[1][:, :t + 1], atol=1e-5)
    assert not torch.allclose(logits[0][:, t + 2:], logits[1][:, t + 2:], atol=1e-3)


def test_carry_stage_is_in_the_plan_only_when_asked():
    """CAPSULE_CARRY_EVAL=1 adds the capsule_carry stage (and needs CAPSULE_ENABLED=1)."""
    assert "capsule_carry" not in [s.name for s in train_gpt.eval_plan(tiny_config().eval)]
    assert train_gpt.eval_plan(tiny_config(CAPSULE_ENABLED=1, CAPSULE_CARRY_EVAL=1).eval)[-1].name == "capsule_carry"
    with pytest.raises(train_gpt.ConfigError, match="CAPSULE_CARRY_EVAL"):
        tiny_config(CAPSULE_CARRY_EVAL=1)


@pytest.mark.parametrize("env, variable", [(dict(ENGRAM_NUM_ORDERS=4), "ENGRAM_NUM_ORDERS"), (dict(MOE_TOP_K=5), "MOE_TOP_K"),
                                           (dict(ENGRAM_INJECT_LAYER=4), "ENGRAM_INJECT_LAYER")])
def test_bad_addon_config_names_the_variable(env, variable):
    with pytest.raises(train_gpt.ConfigError, match=variable):
        tiny_config(**env)


@pytest.mark.parametrize("name", TRAINABLE)
def test_export_reload_is_exact(tmp_path, name):
    """serialize -> compress -> write -> load gives the same token NLL for every add-on."""
    model = perturbed_model(**OPTIONS[name], QUANT_EMBED="fp8").eval()
    path = tmp_path / "model.skc"
    train_gpt.write_artifact(path, train_gpt.compress_payload(train_gpt.serialize_model(model)))
    reloaded = train_gpt.load_model_from_artifact(path, "cpu").eval()
    x, y = torch.randint(0, 1024, (2, 40)), torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        assert torch.equal(reloaded.token_nll(x, y), model.token_nll(x, y))
