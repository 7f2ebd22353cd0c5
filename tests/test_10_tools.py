"""Tests of the measurement tooling in tools/: log parser, variants, results table, plot, shell scripts.

None of them runs the real trainer: logs are hand-written, and the proxy_bench pipeline tests swap in a fake
trainer and a fake tokenizer that honour the same command-line and log contracts.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

import ablate  # noqa: E402
import logparse  # noqa: E402
import plot_runs  # noqa: E402

FULL_LOG = """\
train_gpt.py source follows
def main():
    log0(f"step:{step}/{iterations} train_loss:{loss:.4f}")
final = compute()
step: int = 0
====================================================================
versions python:3.11.7 torch:2.11.0 numpy:2.1.0 cuda:12.8 device:cuda:0 world_size:1 flash_attn:False
model_params:73700000 ternary_params:70000000
compile_s:45.2
step:0/5000 train_loss:9.0112 lr_scale:0.0100 step_ms:0.0 tok_s:0 elapsed_s:0.0 remaining_s:240.0
step:100/5000 train_loss:3.2101 lr_scale:0.9500 step_ms:385.2 tok_s:1361234 elapsed_s:38.5 remaining_s:201.5
eval stage:train_step step:100 val_loss:3.3000 val_bpb:1.3100 eval_s:2.0 tokens:492263
step:200/5000 train_loss:2.9000 lr_scale:0.5000 step_ms:385.0 tok_s:1361900 tok_s_gpu:1361900 mfu:0.4100 elapsed_s:77.0 remaining_s:163.0
compile_stats recompiles_after_warmup:0 unique_graphs:1 frames:1
eval stage:train_step step:200 val_loss:2.9500 val_bpb:1.1800 eval_s:2.0 tokens:492263
eval stage:prequant val_loss:2.3000 val_bpb:1.0980 eval_s:12.3 tokens:492263
artifact bytes_total:15800000 bytes_code:60000 bytes_model:15740000 path:artifacts/run.skc
eval stage:roundtrip val_loss:2.3456 val_bpb:1.1235 eval_s:12.3 tokens:492263
eval stage:sliding val_loss:2.3000 val_bpb:1.1010 eval_s:60.4 tokens:492263
export_cost delta_bpb:0.0255 prequant_bpb:1.0980 roundtrip_bpb:1.1235
eval_projection stages:roundtrip,sliding official_val_tokens:40500000 gpus:8 projected_s:746.2 limit_s:600
final val_bpb:1.1010 val_loss:2.3000 stage:sliding bytes_total:15800000 bytes_code:60000 bytes_model:15740000 steps:624 step_ms:385.0 tok_s:1361500
"""

TRUNCATED_LOG = """\
step:10 train_loss:6.5000 step_ms:900.1
step:20 train_loss:6.1000
eval stage:roundtrip val_loss:6.0000 val_bpb:2.4000 eval_s:1.5 tokens:40960 val_max_tokens:40960
eval stage:sliding val_loss:5.9000 val_bpb:2.3500 tokens:40960 val_max_tokens:40960
"""


# ---------------------------------------------------------------------------------------------------------
# Log parser
# ---------------------------------------------------------------------------------------------------------

def test_parse_log_reads_every_event():
    """Each event line of the contract lands in its field with numbers typed."""
    parsed = logparse.parse_log(FULL_LOG)
    assert [record["step"] for record in parsed["train"]] == [0, 100, 200]
    assert parsed["train"][1] == {
        "step": 100, "total_steps": 5000, "train_loss": 3.2101, "lr_scale": 0.95, "step_ms": 385.2,
        "tok_s": 1361234, "elapsed_s": 38.5, "remaining_s": 201.5,
    }
    assert [record["stage"] for record in parsed["evals"]] == ["train_step", "train_step", "prequant", "roundtrip", "sliding"]
    assert parsed["evals"][0]["step"] == 100 and parsed["evals"][0]["val_bpb"] == 1.31
    assert parsed["evals"][3]["val_max_tokens"] is None
    assert parsed["artifact"] == {"bytes_total": 15800000, "bytes_code": 60000, "bytes_model": 15740000,
                                  "path": "artifacts/run.skc"}
    assert parsed["final"]["stage"] == "sliding" and parsed["final"]["steps"] == 624
    assert parsed["compile_s"] == 45.2
    assert parsed["model"] == {"model_params": 73700000, "ternary_params": 70000000}


def test_parse_log_ignores_source_code_and_prose():
    """The trainer's logged source (indented or `name = ...` lines) yields no events."""
    parsed = logparse.parse_log(FULL_LOG.split("=" * 68)[0])
    assert parsed == logparse.empty_parse()


def test_parse_log_reads_todays_fixed_event_names():
    """Today's trainer writes `train step:N ...` and `compile compile_s:...`; they parse like the older lines."""
    parsed = logparse.parse_log("compile compile_s:12.5 warmup_steps:20\ntrain step:10 train_loss:6.5 step_ms:900.1\n"
                                "train step:20 train_loss:6.1 step_ms:899.0\nfinal val_bpb:2.123456789 stage:roundtrip\n")
    assert parsed["compile_s"] == 12.5 and [r["step"] for r in parsed["train"]] == [10, 20]
    assert parsed["train"][-1]["train_loss"] == 6.1 and parsed["final"]["val_bpb"] == 2.123456789


def test_step_line_without_total_is_wallclock_bound():
    """`step:N` without `/TOTAL` parses with total_steps None; missing keys read as None."""
    parsed = logparse.parse_log(TRUNCATED_LOG)
    assert parsed["train"][0] == {"step": 10, "total_steps": None, "train_loss": 6.5, "lr_scale": None,
                                  "step_ms": 900.1, "tok_s": None, "elapsed_s": None, "remaining_s": None}


def test_truncated_eval_keeps_val_max_tokens():
    """`val_max_tokens:N` on an eval line is kept; a missing eval_s reads as None."""
    parsed = logparse.parse_log(TRUNCATED_LOG)
    roundtrip, sliding = parsed["evals"]
    assert roundtrip["val_max_tokens"] == 40960 and roundtrip["val_bpb"] == 2.4
    assert sliding["eval_s"] is None and sliding["step"] is None


def test_missing_events_read_as_none():
    """A log without artifact, final, compile or model lines leaves those fields None."""
    parsed = logparse.parse_log(TRUNCATED_LOG)
    assert parsed["artifact"] is None and parsed["final"] is None
    assert parsed["compile_s"] is None and parsed["model"] is None
    assert logparse.parse_log("") == logparse.empty_parse()


def test_summary_line_of_full_log():
    """The summary line has the contract's keys in order, eval_s summed over post-training stages."""
    line = logparse.summary_line(logparse.parse_log(FULL_LOG), "abc1234", "baseline")
    assert line == ("proxy reported_stage:sliding reported_bpb:1.101 roundtrip_bpb:1.1235 sliding_bpb:1.101 "
                    "export_delta_bpb:0.0255 bytes_total:15800000 steps:624 step_ms:385.0 tok_s:1361500 "
                    "tok_s_gpu:1361900 mfu:0.41 proj_8gpu_steps_600s:12467 compile_s:45.2 recompiles:0 eval_s:85.0 "
                    "eval_proj_8gpu_s:746.2 commit:abc1234 variant:baseline")


def test_projections_scale_with_the_world_size_and_need_a_gpu():
    """2 GPUs at 800 ms/step project to 600 s / (0.8 s * 2 / 8) = 3000 steps; a CPU log projects nothing."""
    two_gpus = FULL_LOG.replace("world_size:1", "world_size:2").replace("step_ms:385.0 tok_s:1361500", "step_ms:800.0 tok_s:1")
    assert logparse.summarize(logparse.parse_log(two_gpus))["proj_8gpu_steps_600s"] == 3000
    on_cpu = logparse.summarize(logparse.parse_log(FULL_LOG.replace("device:cuda:0", "device:cpu")))
    assert on_cpu["proj_8gpu_steps_600s"] is None and on_cpu["mfu"] is None


def test_summary_line_falls_back_and_marks_truncation():
    """Without a final line, steps and step_ms come from the last train line; truncation is flagged."""
    line = logparse.summary_line(logparse.parse_log(TRUNCATED_LOG), None, "tiny")
    summary = logparse.parse_summary_line(line)
    assert summary["steps"] == 20 and summary["step_ms"] is None
    assert summary["roundtrip_bpb"] == 2.4 and summary["sliding_bpb"] == 2.35
    assert summary["reported_bpb"] is None and summary["proj_8gpu_steps_600s"] is None
    assert summary["bytes_total"] is None and summary["compile_s"] is None and summary["eval_s"] == 1.5
    assert summary["commit"] is None and summary["variant"] == "tiny" and summary["val_max_tokens"] == 40960


def test_find_summary_line_takes_the_last_proxy_line():
    """find_summary_line skips other output and reads the last `proxy` line back."""
    text = "tokenizing...\nproxy roundtrip_bpb:9 commit:a variant:x\ntiming total_s:3\nproxy roundtrip_bpb:1.5 commit:b variant:y\n"
    assert logparse.find_summary_line(text) == {"roundtrip_bpb": 1.5, "commit": "b", "variant": "y"}
    assert logparse.find_summary_line("no summary here") is None


def test_logparse_cli_prints_summary(tmp_path):
    """`python tools/logparse.py LOG --commit --variant` prints the summary line."""
    log_path = tmp_path / "run.txt"
    log_path.write_text(FULL_LOG)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "logparse.py"), str(log_path),
                             "--commit", "c0ffee", "--variant", "v"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("proxy reported_stage:sliding reported_bpb:1.101 roundtrip_bpb:1.1235 ")
    assert result.stdout.strip().endswith("variant:v")


# ---------------------------------------------------------------------------------------------------------
# Variants file
# ---------------------------------------------------------------------------------------------------------

def test_parse_variants_reads_names_env_comments_and_blanks():
    """Names keep file order; comments and blank lines are skipped; quoted values keep spaces."""
    text = "# header\n\nbaseline:\nstride: SLIDING_EVAL_STRIDE=64  # why\n  two: A=1 B='x y'\n"
    assert ablate.parse_variants(text) == [
        ("baseline", {}), ("stride", {"SLIDING_EVAL_STRIDE": "64"}), ("two", {"A": "1", "B": "x y"}),
    ]


@pytest.mark.parametrize("bad_text", ["no colon here", "bad name: A=1", "a: NOT_AN_ASSIGNMENT", "a: A=1\na: B=2", "x: 1A=2"])
def test_parse_variants_rejects_malformed_lines(bad_text):
    """A line without `name:`, a bad name, a non-assignment, or a repeated name raises ValueError."""
    with pytest.raises(ValueError):
        ablate.parse_variants(bad_text)


def test_example_variants_file_parses():
    """tools/variants/example.txt has a baseline with no env and the documented examples."""
    variants = dict(ablate.parse_variants((REPO_ROOT / "tools" / "variants" / "example.txt").read_text()))
    assert variants["baseline"] == {}
    assert variants["sliding_stride_64"] == {"SLIDING_EVAL_STRIDE": "64"}
    assert variants["engram"] == {"BIGRAM_HASH_ENABLED": "1"}


# ---------------------------------------------------------------------------------------------------------
# Results table
# ---------------------------------------------------------------------------------------------------------

def make_row(variant="baseline", env=None, summary_text="proxy reported_stage:sliding reported_bpb:1.101 roundtrip_bpb:1.1235 "
             "sliding_bpb:1.101 bytes_total:15800000 steps:624 step_ms:385.0 tok_s:1361500"):
    """A results row built from a summary line, as ablate.py builds it."""
    summary = logparse.parse_summary_line(summary_text)
    return ablate.results_row(summary, "2026-11-24 12:00", "abc1234", "1xNVIDIA H100 80GB HBM3", variant,
                              env or {}, "bash tools/proxy_bench.sh")


def test_docs_results_has_the_table_header():
    """docs/results.md holds the exact header ablate.py appends under, followed by the separator."""
    lines = (REPO_ROOT / "docs" / "results.md").read_text().splitlines()
    header_index = lines.index(ablate.RESULTS_HEADER)
    assert lines[header_index + 1] == ablate.RESULTS_SEPARATOR


def test_results_row_has_one_cell_per_column():
    """A row has every column, NA for missing values, env in backticks, pipes escaped."""
    row = make_row(env={"A": "1|2"}, summary_text="proxy reported_stage:roundtrip reported_bpb:1.2 roundtrip_bpb:1.2 val_max_tokens:4096")
    assert ablate.is_results_row(row)
    assert "| roundtrip | 1.2 (val_max_tokens:4096) | 1.2 (val_max_tokens:4096) | NA |" in row and "`A='1\\|2'`" in row


def test_append_row_lands_inside_the_results_table(tmp_path):
    """Rows go after the table's last line in order, and text after the table stays after them."""
    results_path = tmp_path / "results.md"
    shutil.copy(REPO_ROOT / "docs" / "results.md", results_path)
    with open(results_path, "a") as results_file:
        results_file.write("\nA note below the table.\n")
    first, second = make_row("first"), make_row("second", {"SLIDING_EVAL_STRIDE": "64"})
    ablate.append_row(results_path, first)
    ablate.append_row(results_path, second)
    lines = results_path.read_text().splitlines()
    header_index = lines.index(ablate.RESULTS_HEADER)
    assert lines[header_index + 2: header_index + 4] == [first, second]
    assert lines[-1] == "A note below the table."


def test_append_row_needs_the_header(tmp_path):
    """A results file without the table header is refused, not silently extended."""
    results_path = tmp_path / "results.md"
    results_path.write_text("# nothing here\n")
    with pytest.raises(ValueError):
        ablate.append_row(results_path, make_row())


def test_import_rows_appends_new_rows_once(tmp_path):
    """--import-rows appends device rows, skipping rows already present and non-row lines."""
    results_path = tmp_path / "results.md"
    shutil.copy(REPO_ROOT / "docs" / "results.md", results_path)
    rows_path = tmp_path / "results_rows.md"
    rows_path.write_text(make_row("a") + "\n" + "not a row\n" + make_row("b") + "\n")
    assert ablate.import_rows(rows_path, results_path) == 2
    assert ablate.import_rows(rows_path, results_path) == 0
    assert sum(ablate.is_results_row(line) for line in results_path.read_text().splitlines()) == 2


# ---------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------

def test_plot_runs_writes_a_png(tmp_path):
    """Two logs (one with no final line) become one non-empty PNG."""
    (tmp_path / "full.txt").write_text(FULL_LOG)
    (tmp_path / "truncated.txt").write_text(TRUNCATED_LOG)
    output_path = tmp_path / "compare.png"
    plot_runs.main([str(tmp_path / "full.txt"), str(tmp_path / "truncated.txt"), "-o", str(output_path)])
    assert output_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output_path.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------------
# Shell scripts and the dry-run pipeline (with a fake trainer and tokenizer)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["proxy_bench.sh", "prepare_bench_payload.sh"])
def test_shell_script_syntax(script):
    """`bash -n` accepts the script."""
    subprocess.run(["bash", "-n", str(REPO_ROOT / "tools" / script)], check=True)


FAKE_TOKENIZER = """\
import argparse, glob, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--inputs", nargs="+", required=True)
parser.add_argument("--tokenizer", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--val-file", required=True)
parser.add_argument("--workers", type=int, default=1)
options = parser.parse_args()
files = [path for pattern in options.inputs for path in glob.glob(pattern)]
assert files and os.path.exists(options.val_file) and os.path.exists(options.tokenizer), options
os.makedirs(options.out)
json.dump({"train_files": files}, open(os.path.join(options.out, "meta.json"), "w"))
"""

FAKE_TRAINER = """\
import os
environ = os.environ
assert os.path.exists(os.path.join(environ["DATA_PATH"], "meta.json"))
lines = [
    "config " + " ".join(f"{name}:{environ.get(name, 'unset') or 'empty'}" for name in
        ("RUN_PRESET", "CUDA_VISIBLE_DEVICES", "SLIDING_EVAL", "VOCAB_SIZE", "MAX_WALLCLOCK_SECONDS", "FAKE_KNOB")),
    "compile_s:0.5",
    "step:10 train_loss:5.0000 step_ms:100.0 tok_s:8000",
    "eval stage:roundtrip val_loss:5.1000 val_bpb:2.0000 eval_s:1.0 tokens:4096",
    "eval stage:sliding val_loss:5.0000 val_bpb:1.9000 eval_s:2.0 tokens:4096",
    "final val_bpb:1.9000 val_loss:5.0000 stage:sliding bytes_total:123456 steps:10 step_ms:100.0 tok_s:8000",
]
os.makedirs(environ["LOG_DIR"], exist_ok=True)
with open(os.path.join(environ["LOG_DIR"], environ["RUN_ID"] + ".txt"), "w") as log_file:
    log_file.write("\\n".join(lines) + "\\n")
print("\\n".join(lines))
"""


@pytest.fixture
def fake_pipeline(tmp_path):
    """Environment that points proxy_bench at a fake trainer and tokenizer and at temp folders."""
    bench_dir = REPO_ROOT / ".bench"
    shared_dir = REPO_ROOT.parent / "shared"
    if not (bench_dir / "corpus").is_dir() and not (shared_dir / "corpus").is_dir():
        pytest.skip("neither .bench/ nor ../shared/corpus is here to slice a dry-run corpus from")
    (tmp_path / "fake_tokenizer.py").write_text(FAKE_TOKENIZER)
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    (tmp_path / "out").mkdir()
    environment = dict(os.environ, PROXY_TRAIN_SCRIPT=str(tmp_path / "fake_trainer.py"),
                       PROXY_TOKENIZE_SCRIPT=str(tmp_path / "fake_tokenizer.py"),
                       PROXY_DATA_DIR=str(tmp_path / "data"), PROXY_LOG_DIR=str(tmp_path / "logs"),
                       PROXY_PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    for name in ("PROXY_VARIANT", "PROXY_COMMIT", "PROXY_DRY_RUN", "MAX_WALLCLOCK_SECONDS", "SLIDING_EVAL"):
        environment.pop(name, None)
    return environment


def test_proxy_bench_dry_run_pipeline(fake_pipeline, tmp_path):
    """--dry-run tokenizes a slice, passes the smoke config and KEY=VALUE args on, and prints the summary last."""
    result = subprocess.run(["bash", str(REPO_ROOT / "tools" / "proxy_bench.sh"), "--dry-run", "FAKE_KNOB=7"],
                            env=dict(fake_pipeline, PROXY_COMMIT="abc1234"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line == ("proxy reported_stage:sliding reported_bpb:1.9 roundtrip_bpb:2.0 sliding_bpb:1.9 export_delta_bpb:NA "
                         "bytes_total:123456 steps:10 step_ms:100.0 tok_s:8000 tok_s_gpu:NA mfu:NA proj_8gpu_steps_600s:NA "
                         "compile_s:0.5 recompiles:NA eval_s:3.0 eval_proj_8gpu_s:NA commit:abc1234 variant:FAKE_KNOB=7")
    assert ("config RUN_PRESET:smoke CUDA_VISIBLE_DEVICES:empty SLIDING_EVAL:1 VOCAB_SIZE:8192 "
            "MAX_WALLCLOCK_SECONDS:20 FAKE_KNOB:7") in result.stdout
    copied_logs = list((tmp_path / "out").glob("proxy_FAKE_KNOB_7_*.txt"))
    assert len(copied_logs) == 1
    rerun = subprocess.run(["bash", str(REPO_ROOT / "tools" / "proxy_bench.sh"), "--dry-run"],
                           env=fake_pipeline, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "reusing shards" in rerun.stdout


def test_proxy_bench_env_file_sits_under_the_arguments_and_keeps_the_proxy_clock(fake_pipeline, tmp_path):
    """PROXY_ENV_FILE's values reach the trainer, KEY=VALUE arguments beat them, and its MAX_WALLCLOCK_SECONDS
    never replaces the proxy's."""
    env_file = tmp_path / "contest.env"
    env_file.write_text("# a comment\nFAKE_KNOB=5\nMAX_WALLCLOCK_SECONDS=590\nSLIDING_EVAL=0\n")
    environment = dict(fake_pipeline, PROXY_ENV_FILE=str(env_file), PROXY_COMMIT="abc1234")
    bench = ["bash", str(REPO_ROOT / "tools" / "proxy_bench.sh"), "--dry-run"]
    result = subprocess.run(bench, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SLIDING_EVAL:0 VOCAB_SIZE:8192 MAX_WALLCLOCK_SECONDS:20 FAKE_KNOB:5" in result.stdout
    assert result.stdout.strip().endswith("variant:contest")
    result = subprocess.run(bench + ["FAKE_KNOB=7"], env=environment, capture_output=True, text=True, timeout=120)
    assert "FAKE_KNOB:7" in result.stdout and result.stdout.strip().endswith("variant:contest,FAKE_KNOB=7")
    missing = subprocess.run(bench, env=dict(environment, PROXY_ENV_FILE=str(tmp_path / "nope.env")),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "PROXY_ENV_FILE" in missing.stderr


def test_proxy_bench_aborts_when_tokenization_is_too_slow(fake_pipeline):
    """Tokenization beyond PROXY_MAX_TOKENIZE_S stops the run before training, with a message."""
    result = subprocess.run(["bash", str(REPO_ROOT / "tools" / "proxy_bench.sh"), "--dry-run"],
                            env=dict(fake_pipeline, PROXY_MAX_TOKENIZE_S="-1"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3 and "PROXY_MAX_TOKENIZE_S" in result.stderr
    assert "config RUN_PRESET" not in result.stdout


def test_ablate_dry_run_appends_cpu_rows(fake_pipeline, tmp_path):
    """ablate --dry-run runs each variant, appends cpu-dry-run rows, and copies them to $OUT."""
    results_path = tmp_path / "results.md"
    shutil.copy(REPO_ROOT / "docs" / "results.md", results_path)
    variants_path = tmp_path / "variants.txt"
    variants_path.write_text("baseline:\nknob: FAKE_KNOB=3\nskipped: FAKE_KNOB=4\n")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "ablate.py"), str(variants_path), "--dry-run",
                             "--only", "baseline", "knob", "--results", str(results_path), "--commit", "abc1234"],
                            env=fake_pipeline, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in results_path.read_text().splitlines() if ablate.is_results_row(line)]
    assert len(rows) == 2
    assert "| abc1234 | cpu-dry-run | knob | `FAKE_KNOB=3` | sliding | 1.9 | 2.0 | 1.9 | NA | 123456 | 10 | 100.0 |" in rows[1]
    assert (tmp_path / "out" / "results_rows.md").read_text().splitlines() == rows


def test_ablate_env_file_reaches_proxy_bench_and_the_row_command(fake_pipeline, tmp_path):
    """--env-file runs the variants on top of the file and the row's command reproduces that."""
    results_path = tmp_path / "results.md"
    shutil.copy(REPO_ROOT / "docs" / "results.md", results_path)
    (tmp_path / "variants.txt").write_text("base:\n")
    (tmp_path / "contest.env").write_text("FAKE_KNOB=9\n")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "ablate.py"), str(tmp_path / "variants.txt"),
                             "--dry-run", "--results", str(results_path), "--env-file", str(tmp_path / "contest.env")],
                            env=fake_pipeline, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAKE_KNOB:9" in result.stdout
    row = [line for line in results_path.read_text().splitlines() if ablate.is_results_row(line)][0]
    assert f"`PROXY_ENV_FILE={tmp_path / 'contest.env'} bash tools/proxy_bench.sh --dry-run`" in row


def test_ablate_stops_when_the_budget_is_spent(fake_pipeline, tmp_path):
    """With less budget left than the expected run, no variant starts and no row is written."""
    results_path = tmp_path / "results.md"
    shutil.copy(REPO_ROOT / "docs" / "results.md", results_path)
    variants_path = tmp_path / "variants.txt"
    variants_path.write_text("baseline:\n")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "ablate.py"), str(variants_path), "--dry-run",
                             "--results", str(results_path), "--time-budget-s", "10", "--expected-run-s", "60"],
                            env=fake_pipeline, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "not run: baseline" in result.stdout
    assert results_path.read_text() == (REPO_ROOT / "docs" / "results.md").read_text()


@pytest.mark.parametrize("variants_file", sorted((REPO_ROOT / "tools" / "variants").glob("*.txt")), ids=lambda p: p.name)
def test_every_shipped_variant_is_a_valid_trainer_config(variants_file):
    """Each variant names only real env vars and makes a config the trainer accepts (no typo reaches a GPU)."""
    import train_gpt
    known = {f.name.upper() for _, f in train_gpt.env_fields()}
    for name, env in ablate.parse_variants(variants_file.read_text()):
        assert set(env) <= known, f"{variants_file.name}:{name}: unknown {set(env) - known}"
        config = train_gpt.Config.from_env({k: str(v) for k, v in env.items()})
        train_gpt.layer_plan(config.model)


def test_cpu_proxy_dry_run_writes_our_row_and_the_baselines(tmp_path):
    """tools/cpu_proxy.sh --dry-run (4 steps on a 40-document slice) runs train_gpt.py and the official baseline at
    the same setting and appends one row each under the CPU mini-proxy heading, with full-precision BPB."""
    from conftest import SHARED
    if not (SHARED / "corpus" / "fineweb.train.jsonl.xz").is_file() or not (SHARED / "peers" / "cpu_baseline.py").is_file():
        pytest.skip("the CPU proxy needs ../shared (corpus and peers)")
    results = tmp_path / "results.md"
    env = dict(os.environ, CPU_PROXY_CACHE_DIR=str(tmp_path / "cache"))
    for extra in ([], ["--peer"]):
        run = subprocess.run(["bash", str(REPO_ROOT / "tools" / "cpu_proxy.sh"), "--dry-run", "--results", str(results), *extra],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = results.read_text()
    assert "## CPU mini-proxy" in text
    rows = [line for line in text.splitlines() if "(dry-run)" in line]
    assert len(rows) == 2 and "default (dry-run)" in rows[0] and "peer_baseline (dry-run)" in rows[1]
    assert "| roundtrip |" in rows[0] and "| int8_zlib_roundtrip |" in rows[1]


def test_gpu_check_dry_run_takes_every_measurement_and_summarizes(tmp_path):
    """tools/gpu_check.sh --dry-run runs its four steps on the CPU (env, layer bench with the attention kernel the
    trainer takes, the competition config's code path, the proxy default) and writes their files and a summary."""
    from conftest import SHARED
    if not (REPO_ROOT / ".bench" / "corpus").is_dir() and not (SHARED / "corpus" / "fineweb.train_1mb.jsonl").is_file():
        pytest.skip("the proxy dry run needs .bench/ or ../shared")
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY_TRAIN_S="4", PROXY_DATA_DIR=str(tmp_path / "data"))
    run = subprocess.run(["bash", str(REPO_ROOT / "tools" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "layer_bench kind:attn" in summary and "attention_kernel:sdpa" in summary
    for name in ("competition", "default"):
        assert f"gpu_check: {name} status:0 proxy reported_stage:sliding" in summary, summary[-2000:]
        assert f"{name} export_cost" in summary
    assert {"env.txt", "layer_bench.txt", "competition.txt", "default.txt", "summary.txt"} <= {p.name for p in tmp_path.iterdir()}


def test_cpu_proxy_summary_reads_each_row_against_the_default_and_the_noise_rule(tmp_path):
    """--summarize: the default's seeds give the mean and spread; a training variant is read against the mean, an
    eval-only row (no steps) against its own roundtrip; under 2 x spread it is 'no measurable effect'."""
    import cpu_proxy

    def row(variant, bpb, roundtrip, steps="400"):
        values = dict((c, "NA") for c in cpu_proxy.COLUMNS)
        values.update(variant=variant, reported_bpb=bpb, roundtrip_bpb=roundtrip, steps=steps, env="`X=1`", reported_stage="roundtrip")
        return "| " + " | ".join(values[c] for c in cpu_proxy.COLUMNS) + " |"

    rows = [row("default", "2.460", "2.460"), row("default", "2.462", "2.462"), row("default (dry-run)", "9", "9"),
            row("small_win", "2.459", "2.459"), row("big_win", "2.400", "2.400"), row("worse", "2.480", "2.480"),
            row("eval_stage", "2.450", "2.470", steps="NA")]
    results = tmp_path / "results.md"
    results.write_text("# r\n\n" + cpu_proxy.HEADING + "\n\n" + cpu_proxy.HEADER + "\n" + cpu_proxy.SEPARATOR + "\n" + "\n".join(rows) + "\n")
    lines = cpu_proxy.summarize(cpu_proxy.read_rows(results))
    assert "mean 2.4610, spread (max - min) 0.0020" in lines[0]
    verdicts = {line.split(" | ")[0].strip("| "): (line.split(" | ")[5], line.split(" | ")[-1].strip(" |")) for line in lines[4:]}
    assert verdicts == {"small_win": ("-0.0020", "no measurable effect"), "big_win": ("-0.0610", "better"),
                        "worse": ("+0.0190", "worse"), "eval_stage": ("-0.0200", "better")}
    with pytest.raises(cpu_proxy.ProxyError, match="2 seeds"):
        cpu_proxy.summarize(cpu_proxy.read_rows(results)[2:])


def test_budget_report_sizes_a_variant_given_as_overrides():
    """KEY=VALUE pairs override the config file: a 2-layer model is reported with its own parameter count."""
    small = ["NUM_LAYERS=2", "MODEL_DIM=128", "EMBED_DIM=64", "NUM_HEADS=4", "NUM_KV_HEADS=2", "MLP_MULT=2"]
    run = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "budget_report.py"), *small], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    # per layer: q 128x128, k and v 128x64, out 128x128, MLP 2 x 128x256 -> 114,688 ternary weights
    assert "parameters: ternary 229,376," in run.stdout and "predicted artifact" in run.stdout
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "budget_report.py"), "NUM_LAYERS"], capture_output=True, text=True)
    assert bad.returncode != 0 and "KEY=VALUE" in bad.stderr
