"""MODEL: the storage schemes (one registry: quantize, dequantize, pack, unpack) and the tensor classes that choose
them (QUANT_ATTN / QUANT_MLP / QUANT_EMBED / QUANT_OTHER); int-k with SDClip, late QAT, mixed models."""
import math

import numpy as np
import pytest
import torch

import train_gpt
from conftest import tiny_config, tiny_model

INT_SCHEMES = ["int8", "int7", "int6", "int5", "int4"]


@pytest.mark.parametrize("bits", [4, 5, 6, 7])
@pytest.mark.parametrize("count", [1, 3, 4, 7, 8, 1001])
def test_k_bit_packing_is_exact_and_k_bits_per_value(bits, count):
    """pack_bits stores `bits` per value (int6: 4 values in 3 bytes, int4: 2 per byte) and unpacks exactly."""
    values = np.random.default_rng(count).integers(0, 2 ** bits, size=count).astype(np.uint8)
    packed = train_gpt.pack_bits(values, bits)
    assert len(packed) == -(-count * bits // 8)
    assert np.array_equal(train_gpt.unpack_bits(packed, bits, count), values)


@pytest.mark.parametrize("name", train_gpt.STORAGE_SCHEMES)
def test_every_scheme_packs_and_unpacks_its_codes_exactly(name):
    """For every scheme of the registry: quantize -> pack -> unpack gives the same codes, and dequantizing them gives
    the same weights; the codes of int-k stay within +-qmax."""
    torch.manual_seed(0)
    weight = torch.randn(12, 70) * 0.1
    scheme = train_gpt.SCHEMES[name]
    params = dict(group_size=32) if name == "ternary" else {}
    codes, scales = scheme.quantize(weight, **params)
    encoding, data = scheme.pack(codes.numpy())
    unpacked = torch.from_numpy(scheme.unpack(encoding, data, codes.numel()).reshape(codes.shape))
    assert torch.equal(unpacked, codes)
    assert torch.equal(scheme.dequantize(unpacked, scales, **params), scheme.dequantize(codes, scales, **params))
    if name.startswith("int"):
        assert int(codes.abs().max()) <= scheme.qmax == 2 ** (scheme.bits - 1) - 1


def test_int_quantizer_is_round_to_nearest_on_a_per_row_grid():
    """int-k: scale = fp16(absmax / qmax) per row; every code is round(w / scale); the reconstruction error is at
    most half a step (plus the fp16 rounding of the scale)."""
    torch.manual_seed(1)
    w = torch.randn(5, 64)
    codes, scales = train_gpt.int_quantize(w, 6)
    assert torch.equal(scales, (w.abs().amax(1, keepdim=True) / 31).half())
    assert torch.equal(codes.float(), torch.round(w / scales.float()).clamp(-31, 31))
    assert ((train_gpt.int_dequantize(codes, scales) - w).abs() <= scales.float() * 0.5 + 1e-6).all()


def test_sdclip_scale_is_k_times_the_row_std():
    """GPTQ_SDCLIP_K=k: scale = k * std(row) / qmax, values beyond the clip saturate at +-qmax; a larger k uses fewer
    distinct codes (what makes SDClip codes compress)."""
    torch.manual_seed(2)
    w = torch.randn(8, 512)
    codes, scales = train_gpt.int_quantize(w, 6, clip_k=2.0)
    assert torch.allclose(scales.float(), (2.0 * w.std(1, keepdim=True) / 31).half().float())
    assert int(codes.abs().max()) == 31
    wide = train_gpt.int_quantize(w, 6, clip_k=12.85)[0]
    assert len(wide.unique()) < len(train_gpt.int_quantize(w, 6)[0].unique())


def test_tensor_classes_choose_each_modules_scheme():
    """QUANT_ATTN / QUANT_MLP / QUANT_EMBED / QUANT_OTHER decide the module of every matrix of their class; the
    defaults are ternary blocks with an fp16 embedding."""
    default = tiny_model(BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64, CAPSULE_ENABLED=1)
    assert isinstance(default.blocks[0].mixer.q, train_gpt.TernaryLinear) and default.tok_emb.scheme == "fp16"
    mixed = tiny_model(QUANT_ATTN="int6", QUANT_MLP="ternary", QUANT_EMBED="int7", QUANT_OTHER="fp8",
                       BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64, CAPSULE_ENABLED=1, GPTQ_SDCLIP_K="attn:12.85,embed:20")
    assert mixed.blocks[0].mixer.q.scheme == "int6" and mixed.blocks[0].mixer.q.clip_k == 12.85
    assert isinstance(mixed.blocks[0].mlp.up, train_gpt.TernaryLinear)
    assert mixed.tok_emb.scheme == "int7" and mixed.tok_emb.clip_k == 20.0 and mixed.engram.tables.scheme == "int7"
    assert mixed.engram.value.scheme == "fp8" and mixed.capsules.assign.scheme == "fp8"
    with pytest.raises(train_gpt.ConfigError, match="QUANT_EMBED='ternary'"):
        tiny_config(QUANT_EMBED="ternary")
    with pytest.raises(train_gpt.ConfigError, match="GPTQ_SDCLIP_K"):
        tiny_config(GPTQ_SDCLIP_K="attn:x")
    with pytest.raises(train_gpt.ConfigError, match="FP_STORAGE is no longer a setting: use QUANT_EMBED"):
        train_gpt.Config.from_env({"FP_STORAGE": "fp8"})


def test_int_classes_train_in_full_precision_until_qat_starts():
    """An int-k matrix's forward is the latent weight before QAT_START_FRACTION and its int-k rounding from it on
    (the STE passes the gradient in both); QAT_START_FRACTION=1 never rounds in training."""
    model = tiny_model(QUANT_ATTN="int4", QAT_START_FRACTION=0.5)
    q = model.blocks[0].mixer.q
    model.set_progress(0.25)
    assert torch.equal(q.effective_weight(), q.weight.detach())
    model.set_progress(0.5)
    rounded = train_gpt.int_dequantize(*q.quantize())
    assert torch.equal(q.effective_weight(), rounded) and not torch.equal(rounded, q.weight.detach())
    q.effective_weight().sum().backward()
    assert torch.equal(q.weight.grad, torch.ones_like(q.weight))
    never = tiny_model(QUANT_ATTN="int4").blocks[0].mixer.q
    never.set_progress(1.0)
    assert torch.equal(never.effective_weight(), never.weight.detach())


def test_fp4_codes_pack_as_nibbles():
    """fp4 codes (0..15) take half a byte each when nibble-packed (they were a byte each)."""
    codes, _ = train_gpt.fp_quantize(torch.randn(64, 64), "fp4")
    encoding, data = train_gpt.SCHEMES["fp4"].pack(codes.numpy())
    assert len(train_gpt.pack_bits(codes.numpy().reshape(-1), 4)) == codes.numel() // 2
    assert encoding in ("bits4", "bytes") and len(data) <= codes.numel()


def test_the_registry_holds_exactly_the_scheme_names_the_config_accepts():
    """SCHEMES' keys are STORAGE_SCHEMES (the names QUANT_<CLASS> accepts), in order."""
    assert tuple(train_gpt.SCHEMES) == train_gpt.STORAGE_SCHEMES
    assert all(train_gpt.SCHEMES[name].name == name for name in train_gpt.SCHEMES)
