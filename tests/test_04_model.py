"""MODEL: one ternary quantizer (properties, STE, fp32 under autocast), FP storage, the layer plan, the attention
kernel dispatch, causality."""
import pytest
import torch

import train_gpt
from conftest import assert_causal, tiny_model


@pytest.mark.parametrize("shape, group", [((8, 64), 32), ((5, 70), 32), ((3, 7), 128), ((16, 128), 128)])
def test_ternary_codes_and_scales(shape, group):
    """Codes are in {-1,0,1}; scale = fp16(absmean of the group without padding); code = round(w/scale) clamped."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    codes, scales = train_gpt.ternary_quantize(w, group)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    assert scales.dtype == torch.float16 and scales.shape == (shape[0], -(-shape[1] // group))
    first = w[:, :group]
    assert torch.equal(scales[:, 0], first.abs().mean(1).half())
    last_start = (scales.shape[1] - 1) * group
    assert torch.allclose(scales[:, -1].float(), w[:, last_start:].abs().mean(1).half().float())
    expected = torch.round(w[:, :group] / scales[:, :1].float()).clamp(-1, 1)
    assert torch.equal(codes[:, :group].float(), expected)


def test_ternary_quantize_is_idempotent_on_codes():
    """Dequantize then quantize again gives the same codes (exact reload relies on stored codes, not on this)."""
    w = torch.randn(6, 96)
    codes, scales = train_gpt.ternary_quantize(w, 32)
    codes2, _ = train_gpt.ternary_quantize(train_gpt.ternary_dequantize(codes, scales, 32), 32)
    assert torch.equal(codes, codes2)


def test_ste_passes_gradient_to_latent_weight():
    """Forward uses the dequantized ternary weight exactly; backward gives d(loss)/d(w_hat) to the latent weight."""
    torch.manual_seed(0)
    layer = train_gpt.TernaryLinear(32, 8, 16)
    x = torch.randn(4, 32)
    y = layer(x)
    w_hat = train_gpt.ternary_dequantize(*layer.quantize(), 16)
    assert torch.equal(y, x @ w_hat.T)
    y.square().sum().backward()
    assert torch.allclose(layer.weight.grad, (2 * y).T @ x, atol=1e-5)


def test_turbo_rotation_reconstructs_through_the_same_functions():
    """With rotation the reconstruction is H-rotated codes*scales, and an orthonormal H is its own inverse."""
    h = train_gpt.hadamard(32)
    assert torch.allclose(h @ h, torch.eye(32), atol=1e-6)
    w = torch.randn(4, 64)
    codes, scales = train_gpt.ternary_quantize(w, 32, rotate=True)
    w_hat = train_gpt.ternary_dequantize(codes, scales, 32, rotate=True)
    assert (w_hat - w).norm() < w.norm()


@pytest.mark.parametrize("scheme", ["fp16", "fp8", "fp4"])
def test_quant_embed_roundtrip_is_exact_on_its_own_grid(scheme):
    """fp_dequantize(fp_quantize(w)) lies on the storage grid: quantizing it again gives the same values."""
    w = torch.randn(16, 40)
    w_hat = train_gpt.fp_dequantize(*train_gpt.fp_quantize(w, scheme), scheme)
    err = (w_hat - w).abs().max()
    assert err < {"fp16": 1e-3, "fp8": 0.2, "fp4": 0.6}[scheme] * w.abs().max()
    module = train_gpt.Stored(w.clone(), scheme, "dense")
    assert torch.equal(module.effective_weight(), w_hat)


def test_model_is_causal():
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    model = tiny_model().eval()
    assert_causal(model)


@pytest.mark.parametrize("overrides", [dict(PARALLEL_RESIDUAL_START=2), dict(YARN_FACTOR=4.0, ROPE_DIMS=8),
                                       dict(SOFTCAP_TYPE="tanh", MLP_ACTIVATION="relu2"), dict(EMBED_DIM=0)])
def test_model_options_are_causal(overrides):
    """Each model option keeps the model causal."""
    assert_causal(tiny_model(**overrides).eval())


def test_every_param_in_exactly_one_group():
    """Each parameter has a route tag and lands in exactly one optimizer group."""
    from conftest import tiny_config
    model = tiny_model()
    optimizers = train_gpt.build_optimizers(model, tiny_config().train, fused=False)
    grouped = [id(p) for o in optimizers for g in o.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert len(set(grouped)) == len(grouped)


def test_training_forward_equals_eval_nll():
    """The training loss is the mean of token_nll (no hidden train/eval difference)."""
    model = tiny_model()
    x = torch.randint(0, 1024, (2, 32))
    y = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(x, y), model.token_nll(x, y).mean(), atol=1e-6)


def test_quantizers_under_bf16_autocast_give_the_export_codes():
    """Inside a bf16-autocast forward (CPU autocast forced on here, as CUDA's is in training) the ternary quantizer
    with TurboQuant's Hadamard rotation, and the FP quantizers, give bit-identical codes and scales to the fp32
    export; without fp32_region the rotation's matmul would run in bf16 and move codes and scales."""
    torch.manual_seed(0)
    layer = train_gpt.TernaryLinear(256, 64, 128, rotate=True)
    layer.weight.data.normal_(0, 0.05)
    export_codes, export_scales = layer.quantize()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_codes, train_scales = layer.quantize()
        bf16_rotated = layer.weight.detach().view(64, 2, 128) @ train_gpt.hadamard(128)
        y = layer(torch.randn(3, 256))
    assert bf16_rotated.dtype == torch.bfloat16, "autocast is not on: the test would prove nothing"
    assert torch.equal(train_codes, export_codes) and torch.equal(train_scales, export_scales)
    assert y.dtype == torch.bfloat16
    w = torch.randn(32, 48)
    for scheme in ("fp8", "fp4"):
        exported = train_gpt.fp_quantize(w, scheme)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trained = train_gpt.fp_quantize(w, scheme)
        assert all(torch.equal(a, b) for a, b in zip(exported, trained))


def test_scan_runs_in_fp32_under_autocast():
    """chunked_scan returns float32 states equal to the fp32 computation even inside a bf16 autocast region."""
    torch.manual_seed(0)
    log_decay, inputs, initial = -torch.rand(16), torch.randn(2, 40, 16), torch.zeros(16)
    reference = train_gpt.chunked_scan(log_decay, inputs, initial)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = train_gpt.chunked_scan(log_decay, inputs, initial)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, reference)


def test_flash_attention_dispatch_follows_the_tensors(monkeypatch):
    """With flash-attn installed (a stand-in here) on the query's device, the dispatch takes it under bf16 autocast
    even though rms_norm returned fp32 q/k/v, casting them to bf16; fp32 without autocast goes to SDPA; the kernel
    the run logs (attention_kernel_used) is decided the same way."""
    calls = []

    def fake_flash(q, k, v, causal):
        calls.append((q.dtype, k.dtype, v.dtype, causal))
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).float(), k.transpose(1, 2).float().repeat_interleave(2, 1),
            v.transpose(1, 2).float().repeat_interleave(2, 1), is_causal=True).transpose(1, 2).to(q.dtype)

    monkeypatch.setattr(train_gpt, "FLASH_ATTENTION", fake_flash)
    monkeypatch.setattr(train_gpt, "FLASH_DEVICE_TYPES", ("cpu",))
    model = tiny_model().eval()
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        model.hidden(x)
    assert calls == [] and train_gpt.attention_kernel_used(model.cfg, torch.device("cpu")) == "sdpa"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = train_gpt.rms_norm(torch.randn(2, 16, 4, 16))
        assert q.dtype == torch.float32  # the premise of the defect: rms_norm's output is fp32 under autocast
        assert train_gpt.attention_kernel(q) == "flash_attn"
        model.hidden(x)
    assert len(calls) == 4 and all(c == (torch.bfloat16, torch.bfloat16, torch.bfloat16, True) for c in calls)
    monkeypatch.setattr(train_gpt, "FLASH_ATTENTION", None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert train_gpt.attention_kernel(q) == "sdpa"


@pytest.mark.parametrize("env, kinds", [
    (dict(), ["attn"] * 4),
    (dict(ARCHITECTURE="hybrid"), ["attn", "koopman_ssm"] * 2),
    (dict(ARCHITECTURE="competition", SKC_LAYERS="1"), ["attn", "skc", "attn", "attn"]),
    (dict(LAYER_KINDS="skc,attn, koopman_ssm,attn"), ["skc", "attn", "koopman_ssm", "attn"]),
])
def test_layer_plan_is_layer_kinds_or_the_presets_expansion(env, kinds):
    """LAYER_KINDS is the plan; ARCHITECTURE is a preset expanding to one; the model builds each layer's mixer from
    the registry."""
    from conftest import tiny_config
    cfg = tiny_config(**env).model
    assert train_gpt.layer_plan(cfg) == kinds
    model = train_gpt.GPT(cfg)
    assert [type(block.mixer) for block in model.blocks] == [train_gpt.MIXERS[k] for k in kinds]


@pytest.mark.parametrize("env, needle", [
    (dict(ARCHITECTURE="transformerz"), "ARCHITECTURE='transformerz'"),
    (dict(LAYER_KINDS="attn,attn"), "LAYER_KINDS has 2 entries but NUM_LAYERS=4"),
    (dict(LAYER_KINDS="attn,mamba,attn,attn"), "unknown mixer kind"),
    (dict(LAYER_KINDS="attn,attn,attn,attn", ARCHITECTURE="attn"), "both set"),
    (dict(SKC_LAYERS="1"), "SKC_LAYERS"),
])
def test_bad_layer_plan_names_the_variable(env, needle):
    """A plan that cannot be built is a ConfigError naming LAYER_KINDS / ARCHITECTURE / SKC_LAYERS."""
    from conftest import tiny_config
    with pytest.raises(train_gpt.ConfigError, match=needle):
        train_gpt.layer_plan(tiny_config(**env).model)


def test_a_mixer_class_declares_what_the_rest_of_the_code_asks_of_it():
    """Each registered mixer says its TTT group, whether its layers are parallel blocks and its extra FLOPs; the
    block and the FLOP count read only that (no `kind ==` checks)."""
    from conftest import tiny_config
    cfg = tiny_config(ARCHITECTURE="skc", SKC_PARALLEL_RESIDUAL=1).model
    for kind, mixer in train_gpt.MIXERS.items():
        assert hasattr(mixer, "ttt_group") and callable(mixer.parallel_residual) and callable(mixer.extra_flops_per_token), kind
    block = train_gpt.Block(cfg, 0, "skc")
    assert block.parallel and block.resid_mix.ttt_group == train_gpt.SKCMixer.ttt_group
    assert not train_gpt.Block(cfg, 0, "attn").parallel


def test_every_preset_expands_within_its_declared_kinds():
    """ARCHITECTURE_KINDS (what build_submission keeps of MIXERS) covers every kind each preset's expansion uses."""
    from conftest import tiny_config
    for preset, kinds in train_gpt.ARCHITECTURE_KINDS.items():
        extra = dict(SKC_LAYERS="1,2") if preset == "competition" else {}
        used = set(train_gpt.layer_plan(tiny_config(ARCHITECTURE=preset, **extra).model))
        assert used <= set(kinds.split(",")) and set(kinds.split(",")) <= set(train_gpt.MIXERS), preset
    assert set(train_gpt.ARCHITECTURE_KINDS) == set(train_gpt.ARCHITECTURES)
