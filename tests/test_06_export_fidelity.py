"""QUANTIZE + EXPORT fidelity: clip search, calibration on held-out train tokens, TurboQuant, row pruning,
DDP agreement and determinism; every option's artifact reloads to exactly the model that was measured."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt
from conftest import log_values, run_trainer, tiny_config, tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards are latency-bound; one intra-op thread avoids spin contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturbed(model, seed=0, std=0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def _roundtrip(model, path):
    blob = train_gpt.compress_payload(train_gpt.serialize_model(model))
    train_gpt.write_artifact(path, blob)
    return train_gpt.load_model_from_artifact(path, "cpu").eval(), blob


def _batch(seed=3, vocab=1024):
    torch.manual_seed(seed)
    return torch.randint(0, vocab, (2, 64)), torch.randint(0, vocab, (2, 64))


def _assert_reload_exact(model, reloaded):
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model.token_nll(*batch), reloaded.token_nll(*batch))
    for (name, a), b in zip(model.named_modules(), reloaded.modules()):
        if isinstance(a, train_gpt.TernaryLinear):
            assert torch.equal(a.quantize()[0], b.quantize()[0]), name


@pytest.mark.parametrize("quant_embed", ["fp8", "fp4"])
def test_fp_fake_quant_equals_reload_even_with_zero_rows(tmp_path, quant_embed):
    """fp8/fp4 storage: the training forward's rounding is what reloads, also for all-zero rows (no NaN scales)."""
    model = _perturbed(tiny_model(QUANT_EMBED=quant_embed))
    with torch.no_grad():
        model.tok_emb.weight[5:9] = 0
    reloaded, _ = _roundtrip(model, tmp_path / "m.skc")
    assert torch.isfinite(model.tok_emb.effective_weight()).all()
    assert torch.equal(model.tok_emb.effective_weight(), reloaded.tok_emb.weight)
    _assert_reload_exact(model, reloaded)


@pytest.mark.parametrize("mode", ["percentile", "row_std"])
def test_clip_search_never_increases_reconstruction_error(mode, tmp_path):
    """Every tensor's chosen clip reconstructs the unclipped weight at least as well as no clip. Clipping only
    lowers the absmean scale, which helps only where the scale is too large (here scale_mult 3), so that one clips."""
    model = _perturbed(tiny_model())
    model.blocks[0].mlp.up.scale_mult.fill_(3.0)
    unclipped = {m: train_gpt.reconstruction_error(m, None) for m in train_gpt.ternary_modules(model)}
    clipped = train_gpt.search_clips(model, mode)
    assert clipped >= 1
    for module, error in unclipped.items():
        assert train_gpt.reconstruction_error(module, module.clip_value) <= error
    assert torch.isfinite(model.blocks[0].mlp.up.clip_value).all()
    reloaded, _ = _roundtrip(model, tmp_path / "clipped.skc")
    _assert_reload_exact(model, reloaded)


def test_calibration_tokens_come_from_the_train_tail_never_val(tiny_data, monkeypatch):
    """The calibration slice is the last CALIB_TOKENS + 1 train tokens; export_fidelity with row pruning, clip search
    and scale + threshold calibration opens train shards only (every shard_paths split and load_shard file is
    train) and never calls the val loader."""
    monkeypatch.setattr(train_gpt, "load_val_tokens", lambda *a, **k: pytest.fail("calibration read val tokens"))
    engram = dict(BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64, BIGRAM_HASH_DIM=16)
    env = dict(DATA_PATH=str(tiny_data), CALIB_TOKENS=2048, GPTQ_LITE_ENABLED=1, TERNARY_SCALE_SEARCH=1,
               TERNARY_THRESHOLD_SEARCH=1, CALIB_MAX_EVALS=3, ENGRAM_PRUNE_MIN_HITS=2, **engram)
    config = tiny_config(**env)
    assert config.export.ternary_clip_mode != "none"
    tokens = train_gpt.calibration_tokens(config.run.data_path, 1024, config.export)
    train = np.asarray(train_gpt.load_shard(tiny_data / "fineweb_train_000000.bin", 1024))
    assert len(tokens) == 2049 and np.array_equal(tokens.numpy(), train[-2049:])
    splits, opened = [], []
    shard_paths, load_shard = train_gpt.shard_paths, train_gpt.load_shard
    monkeypatch.setattr(train_gpt, "shard_paths", lambda path, split: splits.append(split) or shard_paths(path, split))
    monkeypatch.setattr(train_gpt, "load_shard", lambda path, vocab: opened.append(os.path.basename(path)) or load_shard(path, vocab))
    lines = []
    train_gpt.export_fidelity(_perturbed(tiny_model(**engram)), config, train_gpt.Dist(), lines.append, 60.0)
    for event in ("export_prune", "export_clip", "export_calib"):
        assert any(line.startswith(event) for line in lines), event
    assert splits and set(splits) == {"train"}, splits
    assert opened and all(name.startswith("fineweb_train_") for name in opened), opened


def _calibrated(tiny_data, seed=0, **overrides):
    env = dict(dict(DATA_PATH=str(tiny_data), CALIB_TOKENS=512, TERNARY_SCALE_SEARCH=1, TERNARY_THRESHOLD_SEARCH=1,
                    GPTQ_LITE_ENABLED=1, CALIB_MAX_EVALS=16, CALIB_MAX_SECONDS=300), **overrides)
    config = tiny_config(**env)
    model = _perturbed(tiny_model(**env), seed)
    train_gpt.export_fidelity(model, config, train_gpt.Dist(), lambda line: None, config.export.calib_max_seconds)
    return model, config


def test_calibration_never_increases_the_calibration_loss(tiny_data):
    """Coordinate search only keeps improvements: calibrated loss <= plain loss, and it does move some buffer."""
    config = tiny_config(DATA_PATH=str(tiny_data), CALIB_TOKENS=512, TERNARY_SCALE_SEARCH=1, TERNARY_THRESHOLD_SEARCH=1, CALIB_MAX_EVALS=16)
    model = _perturbed(tiny_model())
    tokens = train_gpt.calibration_tokens(config.run.data_path, 1024, config.export)
    plain = train_gpt.calibration_loss(model, tokens, 64, 8)
    stats = train_gpt.calibrate_ternary(model, tokens, config.export, 8)
    assert stats["evals"] <= 16 and stats["base_loss"] == plain
    assert train_gpt.calibration_loss(model, tokens, 64, 8) == stats["calib_loss"] <= plain
    moved = [m for m in train_gpt.ternary_modules(model) if float(m.scale_mult) != 1.0 or abs(float(m.threshold) - 0.5) > 1e-6]
    assert moved and stats["calib_loss"] < plain


def test_calibrated_artifact_reloads_exactly_applies_multiplier_once_and_stays_in_budget(tiny_data, tmp_path):
    """Reload of a calibrated + clipped model: same NLL and codes; stored scales already hold scale_mult (a frozen
    layer never re-applies it); the artifact size moves by < 5% and fits the budget."""
    plain = _perturbed(tiny_model())
    model, _ = _calibrated(tiny_data)
    reloaded, blob = _roundtrip(model, tmp_path / "calibrated.skc")
    _assert_reload_exact(model, reloaded)
    for a, b in zip(train_gpt.ternary_modules(model), train_gpt.ternary_modules(reloaded)):
        assert float(a.scale_mult) == float(b.scale_mult)
        assert torch.equal(b.weight, train_gpt.ternary_dequantize(*a.quantize(), a.group_size, a.rotate))
    plain_bytes = len(train_gpt.compress_payload(train_gpt.serialize_model(plain)))
    assert abs(len(blob) - plain_bytes) < 0.05 * plain_bytes and len(blob) < train_gpt.BUDGET_BYTES


def test_calibrated_artifact_is_deterministic(tiny_data):
    """Two calibrations of the same weights give byte-identical payloads (compression is deterministic: test_export)."""
    payloads = [train_gpt.serialize_model(_calibrated(tiny_data, CALIB_MAX_EVALS=8)[0]) for _ in range(2)]
    assert payloads[0] == payloads[1]


def _gloo_worker(rank, init_file, data_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        env = dict(DATA_PATH=data_path, CALIB_TOKENS=512, TERNARY_SCALE_SEARCH=1, TERNARY_THRESHOLD_SEARCH=1,
                   GPTQ_LITE_ENABLED=1, CALIB_MAX_EVALS=16)
        config = tiny_config(**env)
        model = _perturbed(tiny_model())
        tokens = train_gpt.calibration_tokens(data_path, 1024, config.export)
        tokens = tokens if rank == 0 else tokens.flip(0)  # rank 1 alone would choose differently
        train_gpt.align_export(model, tokens, config.export, 8, train_gpt.Dist(rank, 2), lambda line: None, "test")
        buffers = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("scale_mult", "threshold", "clip_value"))}
        torch.save(buffers, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_calibration_gives_identical_buffers(tiny_data, tmp_path):
    """Rank 0 searches, rank 1 waits and takes the broadcast: both end with the same (non-default) buffers."""
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tiny_data), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert any(float(v) != 1.0 for n, v in ranks[0].items() if n.endswith("scale_mult")) or \
        any(abs(float(v) - 0.5) > 1e-6 for n, v in ranks[0].items() if n.endswith("threshold"))


def test_turbo_quant_reload_is_exact_and_rotates(tmp_path):
    """TURBO_QUANT_TRAIN=1: layers rebuild rotated from the artifact's config and the reload is exact."""
    model = _perturbed(tiny_model(TURBO_QUANT_TRAIN=1))
    reloaded, _ = _roundtrip(model, tmp_path / "turbo.skc")
    assert all(m.rotate for m in train_gpt.ternary_modules(reloaded))
    _assert_reload_exact(model, reloaded)
    plain = _perturbed(tiny_model())
    assert not torch.equal(plain.blocks[0].mlp.up.quantize()[0], model.blocks[0].mlp.up.quantize()[0])


@pytest.mark.parametrize("env, match", [
    (dict(TURBO_QUANT_TRAIN=1, BITNET_GROUP_SIZE=48), "power of 2"),
    (dict(TERNARY_CLIP_MODE="max"), "TERNARY_CLIP_MODE"),
    (dict(EXPORT_ALIGNED_TRAIN=1), "nothing to align"),
    (dict(CALIB_MAX_SECONDS=1000), "CALIB_MAX_SECONDS"),
])
def test_bad_export_config_is_refused(env, match):
    """Non-power-of-2 rotation groups and bad export options raise ConfigError."""
    with pytest.raises(train_gpt.ConfigError, match=match):
        tiny_config(**env)


class HitTable(train_gpt.Stored):
    """A tiny hit-counted table: row = token id mod rows."""

    def count_row_hits(self, input_ids):
        return torch.bincount(input_ids.flatten() % self.weight.size(0), minlength=self.weight.size(0))


class GPTWithTable(train_gpt.GPT):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.table = HitTable(torch.randn(16, 8), cfg.quant_embed, "embed")


@pytest.mark.parametrize("quant_embed", ["fp16", "fp8"])
def test_row_pruning_stores_kept_rows_and_reload_restores_zeros(tmp_path, monkeypatch, quant_embed):
    """Rows with fewer hits than the minimum are zeroed and dropped from the artifact; reload gives zeros there."""
    monkeypatch.setattr(train_gpt, "GPT", GPTWithTable)
    torch.manual_seed(0)
    model = GPTWithTable(tiny_config(QUANT_EMBED=quant_embed).model)
    tokens = torch.tensor([0, 1, 1, 2, 2, 2, 18, 18, 18])  # rows 0:1, 1:2, 2:6 (2 and 18)
    dropped = train_gpt.prune_rows(model, tokens, min_hits=2)
    assert dropped == {"table": 14}
    plain_rows = train_gpt.export_report(model)
    reloaded, _ = _roundtrip(model, tmp_path / "pruned.skc")
    assert torch.equal(reloaded.table.weight, model.table.effective_weight())
    assert (reloaded.table.weight[[0, *range(3, 16)]] == 0).all() and (reloaded.table.weight[1:3] != 0).all()
    assert plain_rows["row_bitmap"] == 2
    _assert_reload_exact(model, reloaded)


def test_trainer_with_every_option_logs_export_cost(tiny_data, own_tokenizer, tmp_path):
    """End to end (aligned training, clip + scale + threshold calibration, TurboQuant): export_cost is exactly
    roundtrip - prequant (both logged at full precision)."""
    env = dict(
        DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(own_tokenizer),
        VOCAB_SIZE=1024, NUM_LAYERS=2, MODEL_DIM=64, EMBED_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, BITNET_GROUP_SIZE=32,
        TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=512, COMPILE=0, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, ITERATIONS=6,
        EMA_ENABLED=0, EVAL_BATCH_SEQS=16, VAL_MAX_TOKENS=2048, CODE_BYTES=1, LOG_DIR=tmp_path, OUT_DIR=tmp_path,
        RUN_ID="fidelity", GPTQ_LITE_ENABLED=1, TERNARY_SCALE_SEARCH=1, TERNARY_THRESHOLD_SEARCH=1, CALIB_TOKENS=1024,
        CALIB_MAX_EVALS=12, EXPORT_ALIGNED_TRAIN=1, EXPORT_ALIGNED_START_FRACTION=0.5, TURBO_QUANT_TRAIN=1)
    result = run_trainer(env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert len(log_values(out, "export_calib", "evals")) == 2  # once in training, once at export
    assert "stage:train_fraction_0.500" in out
    delta, pre, post = (float(log_values(out, "export_cost", k)[0]) for k in ("delta_bpb", "prequant_bpb", "roundtrip_bpb"))
    assert delta == post - pre
    assert log_values(out, "export_report", "code_bytes") == ["1"]
