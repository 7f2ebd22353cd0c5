"""MODEL: one ternary quantizer (properties, STE), FP storage, causality of every layer type."""
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
def test_fp_storage_roundtrip_is_exact_on_its_own_grid(scheme):
    """fp_dequantize(fp_quantize(w)) lies on the storage grid: quantizing it again gives the same values."""
    w = torch.randn(16, 40)
    w_hat = train_gpt.fp_dequantize(*train_gpt.fp_quantize(w, scheme), scheme)
    err = (w_hat - w).abs().max()
    assert err < {"fp16": 1e-3, "fp8": 0.2, "fp4": 0.6}[scheme] * w.abs().max()
    module = train_gpt.FPStored(w.clone(), scheme, "dense")
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
    from conftest import tiny_hparams
    model = tiny_model()
    optimizers = train_gpt.build_optimizers(model, tiny_hparams(), fused=False)
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
