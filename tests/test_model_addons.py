"""MODEL: ADD-ONS: engram hash, capsule bank (Koopman, carry), feedback adapters, MoE: causal, exact reload,
aux losses at the right scale, idle experts frozen, DDP smoke run."""
import pytest
import torch

import train_gpt
from conftest import assert_causal, log_values, run_trainer, tiny_hparams, tiny_model, perturbed_model

OPTIONS = {
    "engram": dict(BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64, BIGRAM_HASH_DIM=16, ENGRAM_NUM_ORDERS=3, ENGRAM_INJECT_LAYER=1),
    "capsule": dict(CAPSULE_ENABLED=1, CAPSULE_NUM=4, CAPSULE_DIM=16, KOOPMAN_RANK=2, KOOPMAN_SPECULATIVE_STEPS=2),
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
    optimizers = train_gpt.build_optimizers(model, tiny_hparams(**OPTIONS[name]), fused=False)
    grouped = [id(p) for o in optimizers for g in o.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    x = torch.randint(0, 1024, (2, 32))
    loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    for opt in optimizers:
        opt.step()
    model.post_step()


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


def test_engram_gate_scale_stays_in_range():
    """The gate scale 0.1 + 3.9 sigmoid(param) is inside (0.1, 4) for any parameter value."""
    for value in (-50.0, 0.0, 50.0):
        scale = 0.1 + 3.9 * torch.sigmoid(torch.tensor(value))
        assert 0.1 <= float(scale) <= 4.0


def test_training_forward_equals_eval_nll_with_every_addon():
    """No train/eval difference: with the aux weights at 0 the training loss is the mean eval NLL (progress 1)."""
    model = perturbed_model(**OPTIONS["all"], KOOPMAN_CONSISTENCY_WEIGHT=0, MOE_AUX_WEIGHT=0)
    x, y = torch.randint(0, 1024, (2, 32)), torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        train_loss = model.train()(x, y)
        assert torch.allclose(train_loss, model.eval().token_nll(x, y).mean(), atol=1e-6)


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
    optimizers = train_gpt.build_optimizers(model, tiny_hparams(**overrides), fused=False)
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


def test_carry_holds_only_already_scored_windows():
    """Each window's carry was fed only by earlier, already-scored, non-overlapping windows; changing tokens of a
    later window leaves earlier window scores unchanged; with the carry off the stream equals the plain eval."""
    model = perturbed_model(**OPTIONS["capsule"]).eval()
    tokens = torch.randint(0, 1024, (300,))
    trace = []
    carried = train_gpt.score_stream_with_carry(model, tokens, 64, _tables(), torch.device("cpu"), trace=trace)
    scored = []
    for (start, end), fed in trace:
        assert fed == scored and all(e <= start for _, e in fed)
        scored.append((start, end))
    assert [w for w, _ in trace] == [(s, s + n) for s, n, _ in train_gpt.eval_windows(300, 64, 64)]
    off = train_gpt.score_stream_with_carry(model, tokens, 64, _tables(), torch.device("cpu"), carry_enabled=False)
    plain = train_gpt.score_windows(model, tokens, train_gpt.eval_windows(300, 64, 64), 8, _tables(), torch.device("cpu"))
    assert torch.allclose(off, plain, rtol=1e-12) and not torch.allclose(carried, plain)
    first_two = train_gpt.eval_windows(300, 64, 64)[:2]
    changed = tokens.clone()
    changed[129:] = torch.randint(0, 1024, (171,))
    prefix = train_gpt.score_stream_with_carry(model, tokens, 64, _tables(), torch.device("cpu"), windows=first_two)
    assert torch.equal(prefix, train_gpt.score_stream_with_carry(model, changed, 64, _tables(), torch.device("cpu"), windows=first_two))


def test_carry_stage_is_in_the_plan_only_when_asked():
    """CAPSULE_CARRY_EVAL=1 adds the capsule_carry stage (and needs CAPSULE_ENABLED=1)."""
    assert "capsule_carry" not in [n for n, _ in train_gpt.eval_plan(tiny_hparams())]
    assert train_gpt.eval_plan(tiny_hparams(CAPSULE_ENABLED=1, CAPSULE_CARRY_EVAL=1))[-1][0] == "capsule_carry"
    with pytest.raises(train_gpt.ConfigError, match="CAPSULE_CARRY_EVAL"):
        tiny_hparams(CAPSULE_CARRY_EVAL=1)


@pytest.mark.parametrize("env, variable", [(dict(ENGRAM_NUM_ORDERS=4), "ENGRAM_NUM_ORDERS"), (dict(MOE_TOP_K=5), "MOE_TOP_K"),
                                           (dict(ENGRAM_INJECT_LAYER=4), "ENGRAM_INJECT_LAYER")])
def test_bad_addon_config_names_the_variable(env, variable):
    with pytest.raises(train_gpt.ConfigError, match=variable):
        tiny_hparams(**env)


@pytest.mark.parametrize("name", TRAINABLE)
def test_export_reload_is_exact(tmp_path, name):
    """serialize -> compress -> write -> load gives the same token NLL for every add-on."""
    model = perturbed_model(**OPTIONS[name], FP_STORAGE="fp8").eval()
    path = tmp_path / "model.skc"
    train_gpt.write_artifact(path, train_gpt.compress_payload(train_gpt.serialize_model(model)))
    reloaded = train_gpt.load_model_from_artifact(path, "cpu").eval()
    x, y = torch.randint(0, 1024, (2, 40)), torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        assert torch.equal(reloaded.token_nll(x, y), model.token_nll(x, y))


def test_ddp_smoke_run_with_moe_and_engram(tiny_data, tmp_path):
    """Two gloo ranks train MoE + engram for 2 steps (all experts in the graph every step) and print a final line."""
    env = dict(train_gpt_env(tiny_data, tmp_path), MOE_ENABLED=1, BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=256,
               MOE_START_FRACTION=0.0, ITERATIONS=2, CAPSULE_ENABLED=1, CAPSULE_CARRY_EVAL=1, VAL_MAX_TOKENS=2048)
    result = run_trainer(env, nproc=2, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert log_values(result.stdout, "final", "stage") == ["capsule_carry"]
    assert float(log_values(result.stdout, "final", "val_bpb")[0]) > 0


def train_gpt_env(tiny_data, tmp_path):
    from conftest import SP1024, TINY
    return dict(TINY, DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(SP1024), LOG_DIR=str(tmp_path / "logs"),
                OUT_DIR=str(tmp_path / "out"), RUN_ID="ddp_addons", CODE_BYTES="60000")
