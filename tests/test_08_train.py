"""TRAIN + MAIN in fresh processes on one rank: the smoke preset end to end (with and without ../shared), the
stops that write no artifact (NaN, runaway loss, over the budget), the compile warm-up, the size estimate, the
post-loop train-data work inside the budget, EVAL_ONLY without train data."""
import json
import math
import re
import shutil
import subprocess

import pytest
import torch

import train_gpt
from conftest import REPO, log_values, require_shared, run_trainer, tiny_config, tiny_model, trainer_env


def _check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_grad_accum_must_divide_over_ranks():
    """GRAD_ACCUM_STEPS that does not split over the world size is refused."""
    config = tiny_config(GRAD_ACCUM_STEPS=3)
    with pytest.raises(train_gpt.ConfigError, match="GRAD_ACCUM_STEPS"):
        train_gpt.grad_accum_steps(config.train, 64, train_gpt.Dist(world_size=2))


def test_nan_loss_stops_with_step_and_last_finite_loss_and_writes_no_artifact(tiny_data, own_tokenizer, tmp_path):
    """A diverging run stops at the first non-finite loss, names that step and the last finite loss (a number, the
    one logged at the step before), and leaves no artifact behind."""
    result = run_trainer(trainer_env(tiny_data, own_tokenizer, tmp_path, EMBED_LR="1e30", SCALAR_LR="1e30", ITERATIONS="20",
                                     GRAD_CLIP_NORM="0", LOSS_RUNAWAY_RATIO="0"))
    assert result.returncode != 0
    assert "No artifact was written" in result.stderr
    found = re.search(r"train loss is (\S+) at step (\d+); last finite loss (\S+) at step (\d+)\.", result.stderr)
    assert found, result.stderr[-2000:]
    bad_loss, bad_step, last_loss, last_step = float(found[1]), int(found[2]), float(found[3]), int(found[4])
    logged = [float(v) for v in log_values(result.stdout, "train ", "train_loss")]
    assert not math.isfinite(bad_loss) and bad_step == len(logged) + 1 >= 2 and last_step == bad_step - 1
    assert math.isfinite(last_loss) and last_loss == pytest.approx(logged[-1], abs=1e-4)
    assert not list((tmp_path / "out").rglob("*.skc"))


def test_runaway_loss_stops_the_run_before_export_naming_the_ratio(tiny_data, own_tokenizer, tmp_path):
    """A finite loss far above a uniform guess (here an aux term weighted 1000x) stops the run at that step with a
    message naming LOSS_RUNAWAY_RATIO and the aux terms, and no artifact; LOSS_RUNAWAY_RATIO=0 turns the stop off."""
    env = trainer_env(tiny_data, own_tokenizer, tmp_path, MOE_ENABLED="1", MOE_AUX_WEIGHT="1000", ITERATIONS="2", CODE_BYTES="1")
    result = run_trainer(env)
    assert result.returncode != 0 and "ran away" in result.stderr and "LOSS_RUNAWAY_RATIO=2.0" in result.stderr, result.stderr[-2000:]
    assert "auxiliary loss" in result.stderr and not list((tmp_path / "out").rglob("*.skc"))
    assert run_trainer(dict(env, LOSS_RUNAWAY_RATIO="0", OUT_DIR=str(tmp_path / "off"))).returncode == 0


def test_model_over_the_budget_stops_before_step_one_and_writes_no_artifact(tiny_data, own_tokenizer, tmp_path):
    """CODE_BYTES=16,000,000 puts code + model estimate over the limit: the run exits non-zero before step 1 with
    a message naming the estimate and the 16,000,000-byte limit, and writes no artifact."""
    result = run_trainer(trainer_env(tiny_data, own_tokenizer, tmp_path, CODE_BYTES="16000000"))
    assert result.returncode != 0
    assert "estimate_before_training" in result.stderr and "exceeds the 16,000,000-byte limit" in result.stderr, result.stderr[-2000:]
    assert not log_values(result.stdout, "train ", "train_loss")
    assert not list((tmp_path / "out").rglob("*.skc"))


def test_compile_warmup_restores_weights_optimizer_and_data_position(tiny_data):
    """WARMUP_STEPS run real steps, then put weights, optimizer state and the data position back exactly."""
    config = tiny_config(WARMUP_STEPS=2, DATA_PATH=str(tiny_data))
    run = train_gpt.Dist()
    model = tiny_model()
    optimizers = train_gpt.build_optimizers(model, config.train, fused=False)
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(tiny_data, "train"), 1024, 0, 1, run.device)
    train_gpt.train_step(model, optimizers, loader, config.train, 64, run, 2, 0, 0.1)  # optimizer state exists before warm-up
    before = ({k: v.clone() for k, v in model.state_dict().items()}, loader.state(),
              [json.dumps({k: str(v) for k, v in o.state_dict()["state"].items()}) for o in optimizers])
    train_gpt.compile_warmup(model, optimizers, loader, config.train, 64, run, 2, model)
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert loader.state() == before[1]
    assert [json.dumps({k: str(v) for k, v in o.state_dict()["state"].items()}) for o in optimizers] == before[2]


def test_smoke_preset_end_to_end(tmp_path):
    """RUN_PRESET=smoke tokenizes its corpus (the ../shared FineWeb slice, sp8192), logs the preset's rewrite of
    DATA_PATH / TOKENIZER_PATH / VOCAB_SIZE before the config line, trains (loss goes down), exports, reloads and
    scores; the reloaded artifact's roundtrip differs from the pre-export BPB only by the fp16 rounding of the
    scalars (|export cost| < 1e-3 BPB), and submission.json holds the exact final val_bpb."""
    require_shared()
    out = _check(run_trainer(dict(RUN_PRESET="smoke", MAX_WALLCLOCK_SECONDS="0", ITERATIONS="8", LOG_DIR=str(tmp_path / "logs"),
                                  OUT_DIR=str(tmp_path / "out"), DATA_PATH=str(tmp_path / "data"), RUN_ID="smoke",
                                  VAL_MAX_TOKENS="8192")))
    lines = out.splitlines()
    rewrite = next(i for i, line in enumerate(lines) if line.startswith("preset_rewrite preset:smoke"))
    assert rewrite < next(i for i, line in enumerate(lines) if line.startswith("config ")) and "VOCAB_SIZE:8192" in lines[rewrite]
    losses = [float(v) for v in log_values(out, "train ", "train_loss")]
    assert losses[-1] < losses[0] - 0.5
    prequant = float(log_values(out, "eval stage:prequant", "val_bpb")[0])
    roundtrip = float(log_values(out, "eval stage:roundtrip", "val_bpb")[0])
    assert abs(roundtrip - prequant) < 1e-3
    submission = json.loads((tmp_path / "out" / "smoke" / "submission.json").read_text())
    assert submission["val_bpb"] == roundtrip == float(log_values(out, "final", "val_bpb")[0])
    assert submission["bytes_total"] == submission["bytes_code"] + submission["bytes_model"]


def test_smoke_preset_without_shared_uses_the_projects_own_text(tmp_path):
    """A checkout with no ../shared still runs the smoke preset end to end, on its own docs and sources, and says so."""
    checkout = tmp_path / "alone" / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, checkout / name)
    out = run_trainer(dict(RUN_PRESET="smoke", MAX_WALLCLOCK_SECONDS="0", ITERATIONS="3", RUN_ID="alone", VAL_MAX_TOKENS="8192"),
                      cwd=checkout, script=checkout / "train_gpt.py")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "no ../shared/corpus found" in out.stdout and "final val_bpb:" in out.stdout


def test_flops_per_token_counts_matmuls_and_what_each_mixer_adds():
    """6 x (2-D params) + each attention layer's 6 x width x seq_len, by hand for the tiny model."""
    model = tiny_model()
    matmul = sum(p.numel() for p in model.parameters() if p.route != "scalar")
    assert matmul == 1024 * 32 + 2 * 64 * 32 + 4 * (64 * 64 * 2 + 2 * 64 * 32 + 2 * 64 * 128)
    assert train_gpt.flops_per_token(model, 64) == 6 * matmul + 6 * 4 * 64 * 64
    skc = tiny_model(ARCHITECTURE="competition", SKC_LAYERS="1")
    assert train_gpt.flops_per_token(skc, 64) == 6 * sum(p.numel() for p in skc.parameters() if p.route != "scalar") + 6 * 3 * 64 * 64


def test_size_estimate_before_training_is_within_3_percent_of_the_artifact(tiny_data, own_tokenizer, tmp_path):
    """For a ternary-dominated model (the competition regime: fp8 embedding, ternary blocks) the pre-training
    estimate is within 3% of the real artifact after training. (Where fp16 embeddings dominate, as in the smoke
    preset, their compressibility moves with training and the estimate is only good to about 10%.)"""
    env = trainer_env(tiny_data, own_tokenizer, tmp_path, MODEL_DIM="128", NUM_HEADS="4", MLP_MULT="4", QUANT_EMBED="fp8",
                      ITERATIONS="30", TRAIN_LOG_EVERY="10", GRAD_ACCUM_STEPS="1", CODE_BYTES="1")
    out = _check(run_trainer(env))
    estimate, actual = (int(v) for v in log_values(out, "budget", "bytes_model"))
    assert abs(estimate - actual) / actual < 0.03, (estimate, actual)


def test_train_data_is_read_inside_the_budget_and_eval_only_needs_none(tiny_data, own_tokenizer, tmp_path):
    """With TEMP_SCALING=1 and calibration under a wallclock budget the loop stops early by the reserve, the fit and
    calibration run after it and are logged inside MAX_WALLCLOCK_SECONDS, and the temperature goes into the artifact.
    EVAL_ONLY on a folder with no train shard at all then runs every stage (capsule carry, sliding, TTT, n-gram,
    EvalEngram), TEMP_SCALING=1 included, and uses the stored temperature."""
    env = trainer_env(tiny_data, own_tokenizer, tmp_path, MAX_WALLCLOCK_SECONDS="60", ITERATIONS="5", TEMP_SCALING="1",
                      TEMP_FIT_TOKENS="2048", TERNARY_SCALE_SEARCH="1", CALIB_TOKENS="1024", CALIB_MAX_EVALS="4", CALIB_MAX_SECONDS="5",
                      CAPSULE_ENABLED="1", CAPSULE_NUM="4", CAPSULE_DIM="16", CODE_BYTES="1", RUN_ID="temp")
    out = _check(run_trainer(env))
    reserve, loop = (float(log_values(out, "train_budget", key)[0]) for key in ("reserve_s", "loop_s"))
    assert reserve == 5 + train_gpt.TEMPERATURE_FIT_RESERVE_S and loop == 60 - reserve
    assert log_values(out, "train_data_after_loop", "within_budget") == ["1"]
    fitted = float(log_values(out, "temperature_fit", "temperature")[0])
    artifact = tmp_path / "out" / "temp" / "final_model.skc"
    assert train_gpt.model_from_artifact(artifact.read_bytes(), artifact, "cpu")[1]["temperature"] == fitted
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    shutil.copy(tiny_data / "fineweb_val_000000.bin", val_only)
    stages = dict(SLIDING_EVAL="1", SLIDING_EVAL_STRIDE="32", CAPSULE_CARRY_EVAL="1", TTT_ENABLED="1", TTT_CHUNK_TOKENS="512",
                  NGRAM_CACHE_ENABLED="1", NGRAM_BUCKETS="4096", EVAL_ENGRAM_ENABLED="1", EVAL_ENGRAM_BUCKETS="64")
    evaluated = _check(run_trainer(dict(env, EVAL_ONLY="1", ARTIFACT=str(artifact), DATA_PATH=str(val_only), RUN_ID="eval", **stages)))
    assert log_values(evaluated, "eval ", "stage") == ["roundtrip", "sliding", "capsule_carry", "ttt", "ngram", "evalengram"]
    assert not any(line.startswith("temperature_fit") for line in evaluated.splitlines())  # read from the artifact, not fitted
    assert log_values(evaluated, "final", "stage") == ["evalengram"]


def test_mixed_ternary_int_model_trains_exports_with_gptq_and_lqer_and_was_estimated_within_3_percent(tiny_data, own_tokenizer, tmp_path):
    """QUANT_MLP=ternary QUANT_ATTN=int6 QUANT_EMBED=int7 with SDClip, late QAT, GPTQ on self-generated text and LQER
    trains, exports, reloads and scores; its pre-training size estimate is within 3% of the artifact."""
    env = trainer_env(tiny_data, own_tokenizer, tmp_path, QUANT_ATTN="int6", QUANT_MLP="ternary", QUANT_EMBED="int7",
                      GPTQ_SDCLIP_K="attn:12.85,embed:20", QAT_START_FRACTION="0.5", GPTQ="1", GPTQ_CALIB="selfgen",
                      GPTQ_CALIB_TOKENS="512", LQER_RANK="2", MODEL_DIM="128", NUM_HEADS="4", MLP_MULT="4", ITERATIONS="30",
                      TRAIN_LOG_EVERY="10", GRAD_ACCUM_STEPS="1", CODE_BYTES="1")
    out = _check(run_trainer(env))
    assert log_values(out, "export_gptq", "matrices") and log_values(out, "export_lqer", "rank") == ["2"]
    estimate, actual = (int(v) for v in log_values(out, "budget", "bytes_model"))
    assert abs(estimate - actual) / actual < 0.03, (estimate, actual)
    report = next(line for line in out.splitlines() if line.startswith("export_report"))
    assert "int_codes" in report and "ternary_codes" in report and "lqer" in report
    assert float(log_values(out, "final", "val_bpb")[0]) > 0
