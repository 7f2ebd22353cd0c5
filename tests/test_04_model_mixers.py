"""MODEL: the SKC and Koopman mixers (their scan against a loop), XSA, VRL, shared blocks, depth recurrence,
stochastic depth, ternary noise, the sequence-length curriculum: causality, gradients and exact reload of each (their
DDP run is in test_08_train_distributed.py)."""
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import REPO, WARM_UP_SCRIPT, assert_causal, perturbed_model, tiny_config, tiny_model

ARCHITECTURES = {
    "attn": dict(ARCHITECTURE="attn"),
    "skc": dict(ARCHITECTURE="skc"),
    "koopman_ssm": dict(ARCHITECTURE="koopman_ssm"),
    "hybrid": dict(ARCHITECTURE="hybrid"),
    "competition": dict(ARCHITECTURE="competition", SKC_LAYERS="1,2", PARALLEL_RESIDUAL_START=2),
}

OPTIONS = {
    "koopman_no_bos_reset": dict(ARCHITECTURE="koopman_ssm", RESET_SSM_ON_BOS=0),
    "skc_parallel_residual": dict(ARCHITECTURE="skc", SKC_PARALLEL_RESIDUAL=1, SKC_AMP_RAMP_FRACTION=0.5),
    "skc_aux_entropy": dict(ARCHITECTURE="competition", SKC_LAYERS="0", SKC_AUX_ENTROPY_FRACTION=0.1),
    "xsa": dict(XSA_START_LAYER=1),
    "vrl": dict(ARCHITECTURE="hybrid", VRL_ENABLED=1, VRL_START_LAYER=1),
    "shared_blocks": dict(ARCHITECTURE="hybrid", SHARED_BLOCKS=2),
    "recurrence": dict(ARCHITECTURE="competition", SKC_LAYERS="1", RECURRENCE_LAYERS="1,2", RECURRENCE_DEPTH=2,
                       RECURRENCE_START_FRACTION=0.5),
    "stochastic_depth_and_noise": dict(ARCHITECTURE="hybrid", STOCHASTIC_DEPTH=0.5, TERNARY_NOISE_SCALE=0.5),
}


def naive_scan(log_decay, inputs, initial, segments=None):
    B, T, C = inputs.shape
    decay = log_decay.expand(B, T, C).exp()
    state, states = initial.expand(B, C).clone(), []
    for t in range(T):
        if segments is not None and t > 0:
            state = state * (segments[:, t] == segments[:, t - 1]).float()[:, None]
        state = decay[:, t] * state + inputs[:, t]
        states.append(state)
    return torch.stack(states, 1)


@pytest.mark.parametrize("with_segments", [False, True])
@pytest.mark.parametrize("decay", ["per_step", "per_channel"])
@pytest.mark.parametrize("chunk", [16, 4, 64])
def test_chunked_scan_equals_sequential_reference(with_segments, decay, chunk):
    """The loop-free chunked scan equals a step-by-step loop to 1e-5 over T=50: input-dependent (B, T, C) and
    time-invariant (C,) decays, document resets, one chunk (64), chunks (16) and chunks of chunks (4: 13 chunks,
    whose carries are themselves scanned in 4 chunks)."""
    torch.manual_seed(0)
    B, T, C = 3, 50, 8
    log_decay = -torch.nn.functional.softplus(torch.randn(B, T, C) if decay == "per_step" else torch.randn(C))
    inputs, initial = torch.randn(B, T, C), torch.randn(C)
    segments = (torch.rand(B, T) < 0.1).long().cumsum(1) if with_segments else None
    fast = train_gpt.chunked_scan(log_decay, inputs, initial, segments, chunk=chunk)
    assert torch.allclose(fast, naive_scan(log_decay, inputs, initial, segments), atol=1e-5)


@pytest.mark.parametrize("decay", ["per_step", "per_channel"])
def test_chunked_scan_gradients_equal_the_sequential_reference(decay):
    """Backward through the chunked scan (chunks of chunks, resets) gives the loop's gradients for decay, inputs and
    initial state."""
    torch.manual_seed(1)
    B, T, C = 2, 37, 5
    raw = torch.randn(B, T, C) if decay == "per_step" else torch.randn(C)
    segments = (torch.rand(B, T) < 0.1).long().cumsum(1)
    grads = []
    for scan in (lambda *a: train_gpt.chunked_scan(*a, chunk=4), naive_scan):
        leaves = [raw.clone().requires_grad_(), torch.randn(B, T, C, generator=torch.Generator().manual_seed(2)).requires_grad_(),
                  torch.linspace(-1, 1, C).requires_grad_()]
        out = scan(-torch.nn.functional.softplus(leaves[0]), leaves[1], leaves[2], segments)
        (out * torch.linspace(0.5, 2, C)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*grads))


def test_causal_conv_and_capsule_pool_match_references():
    """Depthwise conv is left-padded (y_t from x_{t-K+1..t}); capsule n at t is the route-weighted mean of f_{<=t}."""
    torch.manual_seed(0)
    x, weight = torch.randn(2, 10, 3), torch.randn(3, 4)
    reference = torch.stack([sum(weight[:, 3 - j] * x[:, t - j] for j in range(4) if t - j >= 0) for t in range(10)], 1)
    assert torch.allclose(train_gpt.causal_depthwise_conv(x, weight), reference, atol=1e-6)
    routes, features = torch.rand(2, 10, 5).softmax(-1), torch.randn(2, 10, 3)
    pooled = train_gpt.SKCMixer.pool(routes, features)
    t, n = 6, 2
    expected = (routes[:, :t + 1, n, None] * features[:, :t + 1]).sum(1) / (routes[:, :t + 1, n].sum(1)[:, None] + 1e-6)
    assert torch.allclose(pooled[:, t, n], expected, atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHITECTURES) + list(OPTIONS))
def test_forward_backward_reaches_every_parameter(name):
    """Each architecture and option trains: finite loss, and every parameter gets a gradient (DDP needs that)."""
    model = perturbed_model(**ARCHITECTURES.get(name, OPTIONS.get(name)))
    model.train()
    x, y = torch.randint(0, 1024, (2, 40)), torch.randint(0, 1024, (2, 40))
    loss = model(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", list(ARCHITECTURES) + list(OPTIONS))
def test_every_architecture_and_option_is_causal(name, monkeypatch):
    """Changing tokens after t leaves logits <= t unchanged (scan chunks of 16, so chunk carries are crossed)."""
    monkeypatch.setattr(train_gpt, "SCAN_CHUNK", 16)
    model = perturbed_model(**ARCHITECTURES.get(name, OPTIONS.get(name))).eval()
    assert_causal(model)


@pytest.mark.parametrize("reset", [1, 0])
def test_koopman_state_resets_at_bos(reset):
    """With RESET_SSM_ON_BOS=1, tokens before a BOS do not change any output at or after it; with 0 they do."""
    model = perturbed_model(ARCHITECTURE="koopman_ssm", RESET_SSM_ON_BOS=reset).eval()
    torch.manual_seed(2)
    x = torch.randint(2, 1024, (2, 40))
    x[:, 24] = train_gpt.BOS_ID
    x2 = x.clone()
    x2[:, :24] = torch.randint(2, 1024, (2, 24))
    with torch.no_grad():
        a, b = model.hidden(x)[0], model.hidden(x2)[0]
    assert torch.allclose(a[:, 24:], b[:, 24:], atol=1e-5) == bool(reset)


def test_routing_entropy_aux_loss_has_the_right_scale():
    """loss(weight w) - loss(weight 0) == w * sum over SKC layers of the mean routing entropy (any batch size)."""
    w = 0.25
    x, y = torch.randint(0, 1024, (3, 40)), torch.randint(0, 1024, (3, 40))
    plain = perturbed_model(ARCHITECTURE="competition", SKC_LAYERS="0,2")
    weighted = perturbed_model(ARCHITECTURE="competition", SKC_LAYERS="0,2", SKC_AUX_ENTROPY_FRACTION=w)
    logits = []
    for router in (m for m in weighted.modules() if isinstance(m, train_gpt.CapsuleRouter)):
        router.register_forward_hook(lambda module, inputs, output: logits.append(output))
    with torch.no_grad():
        difference = weighted(x, y) - plain(x, y)
    assert len(logits) == 2
    entropy = sum(-(l.softmax(-1) * l.softmax(-1).log()).sum(-1).mean() for l in logits)
    assert entropy > 0.1
    assert torch.allclose(difference, w * entropy, atol=1e-5)


def test_skc_parameters_are_tagged_for_ttt():
    """SKC decays, conv weights and residual mixes carry ttt_group='skc' (and a route tag like every parameter)."""
    model = tiny_model(ARCHITECTURE="competition", SKC_LAYERS="1")
    tagged = {n for n, p in model.named_parameters() if getattr(p, "ttt_group", None) == "skc"}
    for name in ("decay_logit", "initial_state", "conv", "conv_mix", "capsule_mix"):
        assert f"blocks.1.mixer.{name}" in tagged
    assert "blocks.1.resid_mix" in tagged and "blocks.0.resid_mix" not in tagged
    assert all(n.startswith("blocks.1.") for n in tagged)


def test_skc_amplitude_ramps_with_progress():
    """SKC_PARALLEL_RESIDUAL: the SKC branch is off at progress 0, half at half the ramp, full after it."""
    model = perturbed_model(ARCHITECTURE="skc", NUM_LAYERS=1, SKC_PARALLEL_RESIDUAL=1, SKC_AMP_RAMP_FRACTION=0.4).eval()
    mixer, h = model.blocks[0].mixer, torch.randn(2, 16, 64)
    outputs = {}
    for progress in (0.0, 0.2, 0.4, 1.0):
        model.set_progress(progress)
        ctx = train_gpt.Context(torch.randint(0, 1024, (2, 16)), None, [], model.progress)
        with torch.no_grad():
            outputs[progress] = mixer(h, ctx)
    assert outputs[0.0].abs().max() == 0 and outputs[1.0].abs().max() > 0
    assert torch.allclose(outputs[0.2], 0.5 * outputs[1.0], atol=1e-6)
    assert torch.equal(outputs[0.4], outputs[1.0])


def test_xsa_removes_the_own_value_direction():
    """Each query head's output is orthogonal to its kv head's value vector (GQA: kv head = h // (H / KV))."""
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = train_gpt.exclude_self_value(y, v)
    for h in range(4):
        assert torch.allclose((out[:, :, h] * v[:, :, h // 2]).sum(-1), torch.zeros(2, 5), atol=1e-5)
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        assert not torch.allclose(perturbed_model(XSA_START_LAYER=1).hidden(x)[0], perturbed_model().hidden(x)[0], atol=1e-4)


def test_vrl_with_lambda_one_is_plain_attention():
    """VRL mixes lambda v + (1 - lambda) v_first from VRL_START_LAYER on; lambda = 1 gives the model without VRL."""
    x = torch.randint(0, 1024, (2, 24))
    vrl, plain = perturbed_model(VRL_ENABLED=1, VRL_START_LAYER=2), perturbed_model()
    lambdas = {n: p for n, p in vrl.named_parameters() if n.endswith("vrl_lambda")}
    assert sorted(lambdas) == ["blocks.2.mixer.vrl_lambda", "blocks.3.mixer.vrl_lambda"]
    with torch.no_grad():
        for name, p in plain.named_parameters():
            dict(vrl.named_parameters())[name].copy_(p)
        assert not torch.allclose(vrl.hidden(x)[0], plain.hidden(x)[0], atol=1e-4)
        for p in lambdas.values():
            p.fill_(1.0)
        assert torch.allclose(vrl.hidden(x)[0], plain.hidden(x)[0], atol=1e-5)


def test_shared_blocks_reuse_mixers_with_per_layer_scales():
    """SHARED_BLOCKS=2 over 4 layers: 2 blocks, layers 2 and 3 have their own scales that change the output."""
    model = perturbed_model(ARCHITECTURE="hybrid", SHARED_BLOCKS=2)
    assert len(model.blocks) == 2 and len(model.layer_scales) == 2
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in perturbed_model(ARCHITECTURE="hybrid").parameters())
    x = torch.randint(0, 1024, (2, 24))
    with torch.no_grad():
        before = model.hidden(x)[0]
        model.layer_scales[1].mlp_scale.mul_(2.0)
        assert not torch.allclose(model.hidden(x)[0], before)
    with pytest.raises(train_gpt.ConfigError, match="SHARED_BLOCKS"):
        tiny_model(ARCHITECTURE="hybrid", SHARED_BLOCKS=3)


def test_recurrence_switches_on_at_its_fraction_and_at_eval():
    """Recurrence is off before RECURRENCE_START_FRACTION (output = plain model) and on from it (and at 1.0)."""
    x = torch.randint(0, 1024, (2, 24))
    recurrent = perturbed_model(RECURRENCE_LAYERS="1", RECURRENCE_START_FRACTION=0.5)
    plain = perturbed_model()
    with torch.no_grad():
        recurrent.set_progress(0.25)
        assert torch.equal(recurrent.hidden(x)[0], plain.hidden(x)[0])
        recurrent.set_progress(0.5)
        assert not torch.allclose(recurrent.hidden(x)[0], plain.hidden(x)[0])


def test_stochastic_depth_and_ternary_noise_are_training_only():
    """In eval mode both are exact no-ops; in training mode the loss becomes random; keep masks are 0 or 1/(1-p)."""
    x, y = torch.randint(0, 1024, (4, 24)), torch.randint(0, 1024, (4, 24))
    for overrides in (dict(STOCHASTIC_DEPTH=0.5), dict(TERNARY_NOISE_SCALE=0.5)):
        noisy, plain = perturbed_model(**overrides), perturbed_model()
        with torch.no_grad():
            assert torch.equal(noisy.eval()(x, y), plain.eval()(x, y))
            noisy.train()
            assert noisy(x, y) != noisy(x, y)
    keep = train_gpt.branch_keep(torch.zeros(1000, 3, 2), 0.25, training=True)
    assert keep.shape == (1000, 1, 1) and torch.equal(keep.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert 0.15 < (keep == 0).float().mean() < 0.35


def test_training_mode_regularizers_are_causal():
    """In training mode (same random draws for both inputs) stochastic depth and weight noise stay causal."""
    model = perturbed_model(ARCHITECTURE="hybrid", STOCHASTIC_DEPTH=0.5, TERNARY_NOISE_SCALE=0.5).train()
    x = torch.randint(0, 1024, (4, 40))
    x2 = x.clone()
    x2[:, 21:] = torch.randint(0, 1024, (4, 19))
    with torch.no_grad():
        torch.manual_seed(7)
        a = model.logits(model.hidden(x)[0])
        torch.manual_seed(7)
        b = model.logits(model.hidden(x2)[0])
    assert torch.allclose(a[:, :21], b[:, :21], atol=1e-5) and not torch.allclose(a[:, 21:], b[:, 21:])


def test_ternary_noise_is_scaled_by_the_group_absmean():
    """noisy codes = quantize(w + s * absmean(group of w) * N(0, 1)); the STE still sends the gradient to w."""
    torch.manual_seed(0)
    layer = train_gpt.TernaryLinear(48, 6, 16)
    layer.noise_scale = 0.3
    w = layer.weight.detach()
    absmean = w.view(6, 3, 16).abs().mean(-1, keepdim=True).expand(6, 3, 16).reshape(6, 48)
    torch.manual_seed(1)
    codes, scales = layer.noisy_quantize()
    torch.manual_seed(1)
    expected = train_gpt.ternary_quantize(w + 0.3 * absmean.half().float() * torch.randn_like(w), 16)
    assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])
    assert not torch.equal(codes, layer.quantize()[0])
    layer(torch.randn(3, 48)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_curriculum_lengths_are_powers_of_two_and_train_step_keeps_tokens():
    """curriculum_seq_len rises monotonically over powers of two to the full length; train_step reshapes (B, T)."""
    lengths = [train_gpt.curriculum_seq_len(f / 100, 32, 1024, 0.5) for f in range(101)]
    assert lengths[0] == 32 and lengths[50:] == [1024] * 51 and lengths == sorted(lengths)
    assert all(n & (n - 1) == 0 for n in lengths)
    config = tiny_config(CURRICULUM_ENABLED=1, CURRICULUM_MIN_SEQ_LEN=16, CURRICULUM_END_FRACTION=0.5, GRAD_ACCUM_STEPS=1)
    shapes = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, y):
            shapes.append(tuple(x.shape))
            return self.w * x.float().mean()

    class Loader:
        def next_batch(self, tokens, seq_len):
            return torch.zeros(tokens // seq_len, seq_len, dtype=torch.long), torch.zeros(tokens // seq_len, seq_len, dtype=torch.long)

    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.param_groups[0].update(base_lr=0.0, base_weight_decay=0.0)
    for fraction in (0.0, 0.3, 0.9):
        train_gpt.train_step(model, [opt], Loader(), config.train, config.model.train_seq_len, train_gpt.Dist(), 1, 0, fraction)
    assert shapes == [(32, 16), (16, 32), (8, 64)]
    with pytest.raises(train_gpt.ConfigError, match="CURRICULUM_MIN_SEQ_LEN"):
        tiny_config(CURRICULUM_ENABLED=1, CURRICULUM_MIN_SEQ_LEN=24)


EXPORT_CASES = dict(ARCHITECTURES, options=dict(ARCHITECTURE="competition", SKC_LAYERS="1,3", SKC_PARALLEL_RESIDUAL=1,
                                                 XSA_START_LAYER=2, VRL_ENABLED=1, SHARED_BLOCKS=2,
                                                 RECURRENCE_LAYERS="2", RECURRENCE_START_FRACTION=0.5))


RELOAD_ALL_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
import train_gpt
batch = torch.load({batch!r})
nlls = {{}}
for name in {names!r}:
    model = train_gpt.load_model_from_artifact({directory!r} + "/" + name + ".skc", "cpu").eval()
    with torch.no_grad():
        nlls[name] = model.token_nll(*batch)
torch.save(nlls, {result!r})
"""


def test_fresh_process_reload_is_exact_for_every_architecture(tmp_path):
    """serialize -> compress -> write -> load in one fresh process: token NLL identical for every architecture."""
    torch.manual_seed(3)
    batch = (torch.randint(0, 1024, (2, 48)), torch.randint(0, 1024, (2, 48)))
    batch[0][:, 20] = train_gpt.BOS_ID
    torch.save(batch, tmp_path / "batch.pt")
    expected = {}
    for name, overrides in EXPORT_CASES.items():
        model = perturbed_model(**overrides).eval()
        train_gpt.write_artifact(tmp_path / f"{name}.skc", train_gpt.compress_payload(train_gpt.serialize_model(model)))
        with torch.no_grad():
            expected[name] = model.token_nll(*batch)
    script = WARM_UP_SCRIPT + RELOAD_ALL_SCRIPT.format(repo=str(REPO), batch=str(tmp_path / "batch.pt"),
                                                       names=list(EXPORT_CASES), directory=str(tmp_path),
                                                       result=str(tmp_path / "out.pt"))
    subprocess.run([sys.executable, "-c", script], check=True)
    reloaded = torch.load(tmp_path / "out.pt")
    for name in EXPORT_CASES:
        assert torch.equal(reloaded[name], expected[name]), name


LEADERBOARD_OPTIONS = {
    "doc_isolation": dict(DOC_ISOLATION=1),
    "attn_gate_full": dict(ATTN_GATE="full"),
    "attn_gate_sparse": dict(ATTN_GATE="sparse", ATTN_GATE_DIMS=8),
    "smear_gate": dict(SMEAR_GATE=1),
    "unet_skip_gate": dict(UNET_SKIP_GATE=1),
    "recurrence_span": dict(RECURRENCE_SPAN="1,2", RECURRENCE_SPAN_LOOPS=2),
    "fused_ce": dict(FUSED_CE=1),
}


@pytest.mark.parametrize("name", sorted(LEADERBOARD_OPTIONS))
def test_leaderboard_options_are_causal_and_every_parameter_trains(name):
    """Each of the leaderboard's model options keeps the model causal and gives every parameter a gradient."""
    model = perturbed_model(**LEADERBOARD_OPTIONS[name])
    assert_causal(model.eval())
    model.train()
    x, y = torch.randint(0, 1024, (2, 40)), torch.randint(0, 1024, (2, 40))
    model(x, y).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_document_isolation_keeps_attention_inside_a_document():
    """DOC_ISOLATION=1: tokens before a BOS change no output at or after it (attention never crosses the BOS);
    without it they do. The mask equals the block-diagonal causal mask built by hand."""
    torch.manual_seed(3)
    x = torch.randint(2, 1024, (2, 40))
    x[:, 17] = train_gpt.BOS_ID
    x2 = x.clone()
    x2[:, :17] = torch.randint(2, 1024, (2, 17))
    for isolated in (1, 0):
        model = perturbed_model(DOC_ISOLATION=isolated).eval()
        with torch.no_grad():
            a, b = model.hidden(x)[0], model.hidden(x2)[0]
        assert torch.allclose(a[:, 17:], b[:, 17:], atol=1e-5) == bool(isolated)
    mask = train_gpt.document_mask(x[:1])[0, 0]
    by_hand = torch.zeros(40, 40, dtype=torch.bool)
    by_hand[:17, :17] = torch.ones(17, 17, dtype=torch.bool).tril()
    by_hand[17:, 17:] = torch.ones(23, 23, dtype=torch.bool).tril()
    assert torch.equal(mask, by_hand)


def test_gates_and_smear_start_as_the_plain_model():
    """SmearGate (lambda 0), the skip gate (2 sigmoid(0) = 1) start exactly as the model without them; the
    attention output gate starts at sigmoid(0) = 1/2 of each head (the output projection is zero-initialized, so
    the start is the same too). Each changes the output once moved off its start."""
    x = torch.randint(0, 1024, (2, 24))
    plain = perturbed_model()
    for overrides in (dict(SMEAR_GATE=1), dict(UNET_SKIP_GATE=1)):
        model = tiny_model(**overrides)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in dict(plain.named_parameters()):
                    p.copy_(dict(plain.named_parameters())[name])
            assert torch.equal(model.hidden(x)[0], plain.hidden(x)[0]), overrides
            for name, p in model.named_parameters():
                if name not in dict(plain.named_parameters()):
                    p.add_(0.5)
            assert not torch.allclose(model.hidden(x)[0], plain.hidden(x)[0]), overrides


def test_span_recurrence_loops_the_block_of_layers_and_switches_on_at_its_fraction():
    """RECURRENCE_SPAN=1,2 with 2 loops runs layers 0,1,2,1,2,1,2,3 (from RECURRENCE_START_FRACTION), where
    RECURRENCE_LAYERS=1,2 runs 0,1,1,2,2,3: the two designs differ."""
    order = []
    model = perturbed_model(RECURRENCE_SPAN="1,2", RECURRENCE_SPAN_LOOPS=2, RECURRENCE_START_FRACTION=0.5)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: order.append(i))
    x = torch.randint(0, 1024, (1, 16))
    with torch.no_grad():
        model.set_progress(0.25)
        model.hidden(x)
        assert order == [0, 1, 2, 3]
        order.clear()
        model.set_progress(0.5)
        model.hidden(x)
    assert order == [0, 1, 2, 1, 2, 1, 2, 3]
    in_place = perturbed_model(RECURRENCE_LAYERS="1,2", RECURRENCE_DEPTH=1)
    with torch.no_grad():
        assert not torch.allclose(in_place.hidden(x)[0], perturbed_model(RECURRENCE_SPAN="1,2").hidden(x)[0])


def test_fused_cross_entropy_equals_the_plain_loss_and_its_gradients():
    """FUSED_CE=1 (row chunks recomputed in backward) gives the plain soft-capped cross-entropy and the same
    gradients: the same float32 ops per row, summed in chunks (float32 sums: relative 1e-6 for 2 x 40 rows)."""
    x, y = torch.randint(0, 1024, (2, 40)), torch.randint(0, 1024, (2, 40))
    losses, grads = [], []
    for fused in (0, 1):
        model = perturbed_model(FUSED_CE=fused)
        loss = model(x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.tok_emb.weight.grad.clone())
    assert torch.allclose(losses[0], losses[1], rtol=1e-6) and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    hidden, head, targets = torch.randn(300, 16), torch.randn(50, 16), torch.randint(0, 50, (300,))
    chunked = train_gpt.chunked_softcap_cross_entropy(hidden, head, targets, 30.0, "poly", rows=64)  # 5 chunks, the last short
    whole = torch.nn.functional.cross_entropy(train_gpt.softcap(hidden @ head.T, 30.0, "poly"), targets)
    assert torch.allclose(chunked, whole, rtol=1e-6)
