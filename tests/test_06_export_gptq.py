"""QUANTIZE + EXPORT: full-Hessian GPTQ (against round to nearest and the closed-form optimal-brain-surgeon step),
its calibration data (train tail or self-generated, never val), LQER, and mixed ternary / int-k models that export,
reload bit-exactly in a fresh process, export byte-identically and are estimated within 3% before training."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, WARM_UP_SCRIPT, tiny_config, tiny_model

MIXED = dict(QUANT_ATTN="int6", QUANT_MLP="ternary", QUANT_EMBED="int7", GPTQ_SDCLIP_K="attn:12.85,embed:20")


def ill_conditioned_problem(rows=24, cols=64, samples=512, seed=0):
    """W (rows, cols) and inputs X (samples, cols) whose features are strongly correlated: H = X^T X has singular
    values from 1 down to 1e-4 (an ill-conditioned Hessian, where compensating rounding errors pays most)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
    X = torch.randn(samples, cols, generator=generator) @ torch.diag(torch.logspace(0, -2, cols)) @ basis.T
    return torch.randn(rows, cols, generator=generator), X


def int_grid(W, bits):
    scales = train_gpt.int_scales(W, bits).float()[:, 0]
    qmax = 2 ** (bits - 1) - 1

    def column(w, j):
        code = torch.round(w / scales).clamp(-qmax, qmax)
        return code * scales, code.to(torch.int8)
    return column, scales


def test_gptq_has_less_output_error_than_round_to_nearest():
    """On an ill-conditioned Hessian, ||(W - W_hat) X^T|| of GPTQ is below round to nearest's on the same int4 grid,
    and its codes dequantize to its W_hat."""
    W, X = ill_conditioned_problem()
    column, scales = int_grid(W, 4)
    W_hat, codes = train_gpt.gptq_quantize(W, X.T @ X, column, block=16, damp=0.0)
    rtn = torch.round(W / scales[:, None]).clamp(-7, 7) * scales[:, None]
    gptq_error, rtn_error = ((W_hat - W) @ X.T).norm(), ((rtn - W) @ X.T).norm()
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    assert torch.allclose(codes.float() * scales[:, None], W_hat, atol=1e-6)


def test_gptq_first_column_step_is_the_optimal_brain_surgeon_closed_form():
    """Quantizing only column 0 and letting the others compensate (stop_after=1, no damping, natural order) raises
    the output error ||(W - W~) X^T||^2 by exactly sum over rows (w0 - q0)^2 / [H^-1]_00 (OBS, Hassibi & Stork
    1993), the least any compensation of the other columns can reach."""
    W, X = ill_conditioned_problem(rows=8, cols=12, samples=200, seed=3)
    X = X.double() * 10
    H = X.T @ X
    column, _ = int_grid(W, 3)
    W_partial, _ = train_gpt.gptq_quantize(W, H.float(), column, damp=0.0, act_order=False, stop_after=1)
    q0 = column(W[:, 0], 0)[0]
    expected = float(((W[:, 0].double() - q0.double()) ** 2).sum() / torch.linalg.inv(H)[0, 0])
    measured = float(((W_partial.double() - W.double()) @ X.T).square().sum())
    assert measured == pytest.approx(expected, rel=2e-3)
    assert torch.equal(W_partial[:, 0], q0)


def perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_gptq_calibration_reads_the_train_tail_never_val(tiny_data, monkeypatch):
    """GPTQ_CALIB=train: quantize_for_export opens train shards only (the tail), never the val loader; selfgen
    opens no shard at all."""
    monkeypatch.setattr(train_gpt, "load_val_tokens", lambda *a, **k: pytest.fail("GPTQ read val tokens"))
    opened = []
    load_shard = train_gpt.load_shard
    monkeypatch.setattr(train_gpt, "load_shard", lambda path, vocab: opened.append(str(path)) or load_shard(path, vocab))
    config = tiny_config(DATA_PATH=tiny_data, GPTQ=1, GPTQ_CALIB_TOKENS=1024, **MIXED)
    lines = []
    train_gpt.quantize_for_export(perturbed(tiny_model(**MIXED)), config, train_gpt.Dist(), lines.append)
    assert opened and all("fineweb_train_" in path for path in opened)
    assert any(line.startswith("export_gptq matrices:") for line in lines)
    opened.clear()
    selfgen = tiny_config(DATA_PATH=tiny_data, GPTQ=1, GPTQ_CALIB="selfgen", GPTQ_CALIB_TOKENS=256, **MIXED)
    train_gpt.quantize_for_export(perturbed(tiny_model(**MIXED)), selfgen, train_gpt.Dist(), lines.append)
    assert opened == []


class NextIsPlusOne(torch.nn.Module):
    """A stand-in language model: after token t it puts almost all probability on t + 1."""

    def __init__(self, vocab=64):
        super().__init__()
        self.vocab = vocab
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def hidden(self, ids):
        return ids, []

    def logits(self, ids):
        return torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * 30.0


def test_self_generated_calibration_is_the_models_own_samples_and_deterministic():
    """selfgen tokens start at BOS and follow the model's own distribution (a model that predicts t + 1 after t
    generates 1, 2, 3, ...), in sequences of the given length, the same for a seed."""
    tokens = train_gpt.self_generated_tokens(NextIsPlusOne(), 100, 50, seed=1)
    assert len(tokens) == 100 and tokens[0] == train_gpt.BOS_ID  # 2 sequences of 50, BOS first (BOS_ID = 1)
    assert tokens[:50].tolist() == [1 + i for i in range(50)] and tokens[50] == train_gpt.BOS_ID
    assert torch.equal(tokens, train_gpt.self_generated_tokens(NextIsPlusOne(), 100, 50, seed=1))


def mixed_model_for_export(lqer_rank=2):
    """A mixed tiny model (int6 attention with SDClip, ternary MLP, int7 embedding) after GPTQ (self-generated
    calibration) and LQER, as the trainer's quantize_for_export leaves it."""
    model = perturbed(tiny_model(**MIXED))
    config = tiny_config(GPTQ=1, GPTQ_CALIB="selfgen", GPTQ_CALIB_TOKENS=256, LQER_RANK=lqer_rank, **MIXED)
    train_gpt.quantize_for_export(model, config, train_gpt.Dist(), lambda line: None)
    return model


RELOAD_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
import train_gpt
model = train_gpt.load_model_from_artifact({path!r}, "cpu").eval()
x = torch.load({batch!r})
with torch.no_grad():
    logits = model.logits(model.hidden(x)[0])
weights = {{n: p.detach().clone() for n, p in model.named_parameters()}}
torch.save((logits, weights), {result!r})
"""


def test_mixed_gptq_lqer_model_reloads_bit_exactly_in_a_fresh_process(tmp_path):
    """Mixed ternary / int6 / int7 with GPTQ and LQER: the artifact reloads in a fresh process to bit-identical
    weights (LQER added) and logits; two exports are byte-identical; the LQER factors are in the payload."""
    model = mixed_model_for_export()
    q = model.blocks[0].mixer.q
    assert q.frozen and q.lqer is not None and q.scheme == "int6"
    blob = train_gpt.compress_payload(train_gpt.serialize_model(model))
    assert blob == train_gpt.compress_payload(train_gpt.serialize_model(mixed_model_for_export()))
    assert "lqer" in train_gpt.export_report(model) and "int_codes" in train_gpt.export_report(model)
    train_gpt.write_artifact(tmp_path / "mixed.skc", blob)
    batch = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(1))
    torch.save(batch, tmp_path / "batch.pt")
    script = WARM_UP_SCRIPT + RELOAD_SCRIPT.format(repo=str(REPO), path=str(tmp_path / "mixed.skc"), batch=str(tmp_path / "batch.pt"),
                                                   result=str(tmp_path / "out.pt"))
    subprocess.run([sys.executable, "-c", script], check=True)
    logits, weights = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert torch.equal(logits, model.logits(model.hidden(batch)[0]))
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.detach()), name


def test_lqer_lowers_the_reconstruction_error_by_its_rank():
    """LQER adds the rank-r SVD of the quantization error: the frozen weight's error shrinks, the more the higher r."""
    errors = []
    for rank in (0, 1, 4):
        model = perturbed(tiny_model(QUANT_ATTN="int4"))
        original = model.blocks[0].mixer.q.weight.detach().clone()
        if rank:
            train_gpt.apply_lqer(model, rank, ["attn"], lambda line: None)
            weight = model.blocks[0].mixer.q.weight.detach()
        else:
            weight = train_gpt.int_dequantize(*model.blocks[0].mixer.q.quantize())
        errors.append(float((weight - original).norm()))
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("scheme", ["ternary", "int8", "int6", "int5", "int4", "fp8", "fp4"])
def test_size_estimate_is_within_3_percent_for_every_scheme(scheme):
    """estimate_artifact_bytes (per tensor class: exact payload bytes x an lzma ratio of a sample) lands within 3%
    of the real compressed artifact for a model whose block matrices are all `scheme` (weights random, as trained
    weights are to a compressor), with an fp8 embedding."""
    env = dict(QUANT_ATTN=scheme, QUANT_MLP=scheme, QUANT_EMBED="fp8", MODEL_DIM=128, MLP_MULT=4, VOCAB_SIZE=512)
    model = perturbed(tiny_model(**env))
    estimate = train_gpt.estimate_artifact_bytes(model)
    train_gpt.round_scalars_to_fp16(model)
    actual = len(train_gpt.compress_payload(train_gpt.serialize_model(model)))
    assert abs(estimate - actual) / actual < 0.03, (scheme, estimate, actual)
