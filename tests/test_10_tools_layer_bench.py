"""Tests of tools/layer_bench.py on the CPU: the dry run end to end, the no-GPU refusal, and its pure helpers."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

import layer_bench  # noqa: E402
import logparse  # noqa: E402
import train_gpt  # noqa: E402

SCRIPT = REPO_ROOT / "tools" / "layer_bench.py"
TRAINER_ENV = {f.name.upper() for _, f in train_gpt.env_fields()}


def run_tool(*arguments, out_dir=None):
    """Run the tool in a fresh process without trainer env vars; OUT set to `out_dir` when given."""
    env = {k: v for k, v in os.environ.items() if k not in TRAINER_ENV and k != "OUT"}
    if out_dir is not None:
        env["OUT"] = str(out_dir)
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def records(text, event):
    """The key:value dicts of the lines of `event`."""
    return [logparse.parse_key_values(line.split()[1:]) for line in text.splitlines() if line.split()[:1] == [event]]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("layer_bench_out")
    result = run_tool("--dry-run", "--no-compile", out_dir=out_dir)
    return result, out_dir / "layer_bench.jsonl"


def test_dry_run_prints_every_measurement(dry_run):
    result, _ = dry_run
    assert result.returncode == 0, result.stderr
    layers = records(result.stdout, "layer_bench")
    assert [r["kind"] for r in layers] == list(layer_bench.KINDS)
    for r in layers:
        assert r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 and r["compiled"] == 0
        assert r["model_dim"] == 64 and r["seq_len"] == 64 and r["batch"] == 2
    assert "vs_attn" not in layers[0] and all(r["vs_attn"] > 0 for r in layers[1:])
    quant, = records(result.stdout, "ternary_quant")
    assert quant["status"] == "ok" and quant["rows"] == 256 and quant["cols"] == 64 and 0 < quant["quant_fraction"] < 1
    done, = records(result.stdout, "layer_bench_done")
    assert done["seconds"] > 0
    assert result.stdout.splitlines()[-1].startswith("layer_bench_done")


def test_dry_run_attention_backends_match_the_reference(dry_run):
    result, _ = dry_run
    backends = {r["backend"]: r for r in records(result.stdout, "attn_backend")}
    assert {"sdpa_math", "sdpa_default"} <= set(backends)
    for name in ("sdpa_math", "sdpa_default"):
        r = backends[name]
        limit = 1e-4 if r["dtype"] == "float32" else 5e-2
        assert r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["max_abs_diff"] < limit, r
    assert all(r["status"] in ("ok", "error") for r in backends.values())


def test_json_lines_hold_the_same_records(dry_run):
    result, json_path = dry_run
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    saved = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert [r["event"] for r in saved] == [line.split()[0] for line in lines]
    for line, record in zip(lines, saved):
        printed = logparse.parse_key_values(line.split()[1:])
        assert set(printed) == set(record) - {"event"}
        for key, value in printed.items():
            assert value == pytest.approx(record[key], rel=1e-5) if isinstance(value, float) else value == record[key]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_full_shapes_without_cuda_exit_2_naming_dry_run():
    result = run_tool("--skip-attn-backends")
    assert result.returncode == 2
    assert "--dry-run" in result.stderr and "layer_bench_done" not in result.stdout


def test_compiled_block_reports_compile_time_and_graph_breaks(monkeypatch):
    """The compile path (explain, compile_s) with the cheap aot_eager backend in place of inductor."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    args = layer_bench.parse_args(["--dry-run", "--compile", "--kinds", "attn"])
    lines = []
    layer_bench.bench_blocks(args, torch.device("cpu"), lambda event, **fields: lines.append((event, fields)))
    (event, fields), = lines
    assert event == "layer_bench" and fields["status"] == "ok", fields
    assert fields["compiled"] == 1 and fields["compile_s"] > 0 and fields["graphs"] == 1 and fields["graph_breaks"] == 0


def test_format_line_and_short_error():
    line = layer_bench.format_line("attn_backend", dict(backend="sdpa math", ms=1.23456789, n=3, skip=None))
    assert line == "attn_backend backend:sdpa_math ms:1.23457 n:3"
    assert logparse.parse_key_values(line.split()[1:]) == {"backend": "sdpa_math", "ms": 1.23457, "n": 3}
    assert layer_bench.format_value(1.5e-7) == "1.5e-07"
    error = layer_bench.short_error(RuntimeError("No available kernel.  Aborting execution.\nmore"))
    assert error == "RuntimeError:No_available_kernel.__Aborting_execution." and " " not in error


def test_time_calls_runs_warmup_then_iters():
    calls = []
    times = layer_bench.time_calls(lambda: calls.append(1), iters=4, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)
    assert layer_bench.median_ms(lambda: None, 3, 0, torch.device("cpu")) >= 0


def test_reporter_appends_json_lines(tmp_path, capsys):
    path = tmp_path / "sub" / "bench.jsonl"
    report = layer_bench.Reporter(str(path))
    report("ternary_quant", quant_ms=0.5, skipped=None)
    report("layer_bench_done", seconds=1.0)
    assert capsys.readouterr().out == "ternary_quant quant_ms:0.5\nlayer_bench_done seconds:1\n"
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"event": "ternary_quant", "quant_ms": 0.5}, {"event": "layer_bench_done", "seconds": 1.0}]


def test_parse_args_shapes_kinds_and_trainer_config(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    full = layer_bench.parse_args([])
    assert (full.model_dim, full.num_heads, full.num_kv_heads, full.seq_len, full.batch) == (768, 12, 4, 2048, 32)
    assert full.head_dim == 64 and full.json_out is None and full.kinds == list(layer_bench.KINDS)
    cfg = layer_bench.model_config(full)
    assert (cfg.model_dim, cfg.mlp_mult, cfg.train_seq_len, cfg.bitnet_group_size) == (768, 4.0, 2048, 128)
    dry = layer_bench.parse_args(["--dry-run", "--kinds", "skc,attn", "--batch", "3"])
    assert (dry.model_dim, dry.batch, dry.iters, dry.group_size, dry.kinds) == (64, 3, 2, 32, ["attn", "skc"])
    monkeypatch.setenv("OUT", "/tmp/device_out")
    assert layer_bench.parse_args(["--dry-run"]).json_out == "/tmp/device_out/layer_bench.jsonl"
    with pytest.raises(SystemExit):
        layer_bench.parse_args(["--kinds", "mamba"])
