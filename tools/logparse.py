"""Parse the trainer's `key:value` log into a dict, and format the proxy summary line.

The trainer (train_gpt.py) writes one line per event; the first token names the event and every other
token is `key:value`:

    train step:100 train_loss:3.2101 lr_scale:0.9500 step_ms:385.2 tok_s:1361234 elapsed_s:38.5 remaining_s:201.5
    compile compile_s:45.2 warmup_steps:20
    model_params:73700000 ternary_params:70000000
    eval stage:roundtrip val_loss:2.3456 val_bpb:1.2345 eval_s:12.3 tokens:492263 [val_max_tokens:N]
    eval stage:train_step step:500 val_loss:... val_bpb:...
    artifact bytes_total:15800000 bytes_code:60000 bytes_model:15740000 path:...
    final val_bpb:1.2345 val_loss:2.3456 stage:sliding bytes_total:... steps:620 step_ms:385.0 tok_s:...
    versions python:3.11.7 torch:2.11.0 device:cuda:0 world_size:1 ...
    export_cost delta_bpb:0.0100 prequant_bpb:... roundtrip_bpb:...
    eval_projection stages:roundtrip,sliding official_val_tokens:40500000 gpus:8 projected_s:95.0 limit_s:600
    compile_stats recompiles_after_warmup:0 unique_graphs:1 frames:1

Logs written before the event names became fixed words (`step:100 train_loss:...`, `compile_s:45.2`) parse the
same. The parser is tolerant: unknown lines (the trainer also logs its own source, nvidia-smi, the config) are
skipped, a missing key reads as None, and a value that is not a number stays a string. Only stdlib is used,
so the script runs unchanged on the GPU machine.

Command line:
    python tools/logparse.py LOG --commit abc123 --variant baseline   # prints the `proxy ...` summary line
    python tools/logparse.py LOG --json                               # prints the parsed dict as JSON
"""

import argparse
import json
import math
import re
import sys

# The stage name of the periodic evals during training.
TRAIN_STEP_STAGE = "train_step"
# The keys of the summary line, in print order (commit and variant are appended last). reported_* is the one
# metric the run declared before it started (its eval plan's last stage, from the `final` line).
SUMMARY_KEYS = ("reported_stage", "reported_bpb", "roundtrip_bpb", "sliding_bpb", "export_delta_bpb", "bytes_total",
                "steps", "step_ms", "tok_s", "tok_s_gpu", "mfu", "proj_8gpu_steps_600s", "compile_s", "recompiles",
                "eval_s", "eval_proj_8gpu_s")
# Events that occur once per run (a repeat keeps the last): their `key:value` fields are stored whole.
SINGLE_EVENTS = ("artifact", "final", "versions", "export_cost", "eval_projection", "compile_stats")
# The competition machine the projections are for: 8 GPUs of the kind the run was on, training for 600 s.
PROJECTION_GPUS, PROJECTION_TRAIN_S = 8, 600
# How a missing value is written in the summary line and read back.
MISSING = "NA"

STEP_TOKEN = re.compile(r"^step:(\d+)(?:/(\d+))?$")
KEY_VALUE_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(.*)$")
INTEGER = re.compile(r"^[+-]?\d+$")


def convert_value(text):
    """Return `text` as int, float, or the string itself when it is neither (a path, a stage name)."""
    if INTEGER.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def parse_key_values(tokens):
    """Turn `key:value` tokens into a dict; return None if any token is not `key:value`.

    Requiring every token to be `key:value` keeps prose and source code (which the trainer also logs)
    from being read as events.
    """
    fields = {}
    for token in tokens:
        match = KEY_VALUE_TOKEN.match(token)
        if match is None:
            return None
        fields[match.group(1)] = convert_value(match.group(2))
    return fields


def is_number(value):
    """True for an int or float (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_step_line(tokens):
    """Parse `step:N[/TOTAL] key:value ...` into a train-step dict, or None if it is not one."""
    match = STEP_TOKEN.match(tokens[0])
    rest = parse_key_values(tokens[1:])
    if match is None or rest is None or not rest:
        return None
    total = match.group(2)
    record = {"step": int(match.group(1)), "total_steps": int(total) if total else None}
    for key in ("train_loss", "lr_scale", "step_ms", "tok_s", "elapsed_s", "remaining_s"):
        record[key] = rest.pop(key, None)
    record.update(rest)
    return record


def parse_eval_line(tokens):
    """Parse `eval stage:NAME key:value ...` into an eval dict, or None if it is not one."""
    fields = parse_key_values(tokens[1:])
    if fields is None or not isinstance(fields.get("stage"), str):
        return None
    record = {}
    for key in ("stage", "step", "val_loss", "val_bpb", "eval_s", "tokens", "val_max_tokens"):
        record[key] = fields.pop(key, None)
    record.update(fields)
    return record


def empty_parse():
    """The parse of an empty log: every list empty, every single-event field None."""
    parsed = {"train": [], "evals": [], "compile_s": None, "model": None}
    parsed.update({event: None for event in SINGLE_EVENTS})
    return parsed


def parse_log(text):
    """Parse a trainer log into a dict.

    Keys:
      train     list of train-step dicts (step, total_steps, train_loss, lr_scale, step_ms, tok_s, elapsed_s,
                remaining_s, plus any extra keys), in log order
      evals     list of eval dicts (stage, step, val_loss, val_bpb, eval_s, tokens, val_max_tokens, ...),
                intermediate `train_step` evals and final stages alike, in log order
      artifact  dict of the `artifact` line (bytes_total, bytes_code, bytes_model, path) or None
      final     dict of the `final` line or None
      versions, export_cost, eval_projection, compile_stats   dict of that line or None
      compile_s the `compile_s:` value or None
      model     dict of the `model_params:` line (model_params, ternary_params, ...) or None
    A repeated single event (SINGLE_EVENTS, compile_s, model) keeps its last occurrence.
    """
    parsed = empty_parse()
    for line in text.splitlines():
        tokens = line.split()
        if not tokens or line[0].isspace():
            continue
        event = tokens[0]
        if event == "train" and len(tokens) > 1:
            record = parse_step_line(tokens[1:])
            if record is not None:
                parsed["train"].append(record)
        elif event == "compile":
            fields = parse_key_values(tokens[1:])
            if fields and is_number(fields.get("compile_s")):
                parsed["compile_s"] = fields["compile_s"]
        elif event.startswith("step:"):
            record = parse_step_line(tokens)
            if record is not None:
                parsed["train"].append(record)
        elif event == "eval":
            record = parse_eval_line(tokens)
            if record is not None:
                parsed["evals"].append(record)
        elif event in SINGLE_EVENTS:
            fields = parse_key_values(tokens[1:])
            if fields:
                parsed[event] = fields
        elif event.startswith("compile_s:"):
            fields = parse_key_values(tokens)
            if fields and is_number(fields["compile_s"]):
                parsed["compile_s"] = fields["compile_s"]
        elif event.startswith("model_params:"):
            fields = parse_key_values(tokens)
            if fields and is_number(fields["model_params"]):
                parsed["model"] = fields
    return parsed


def final_evals(parsed):
    """The evals run after training (every stage but `train_step`), in log order."""
    return [record for record in parsed["evals"] if record["stage"] != TRAIN_STEP_STAGE]


def last_eval(parsed, stage):
    """The last eval dict of `stage`, or None."""
    matches = [record for record in parsed["evals"] if record["stage"] == stage]
    return matches[-1] if matches else None


def first_present(*values):
    """The first value that is not None, or None."""
    for value in values:
        if value is not None:
            return value
    return None


def field(record, key):
    """`record[key]` or None when the record itself is None or lacks the key."""
    return None if record is None else record.get(key)


def summarize(parsed):
    """Reduce a parsed log to the summary numbers (SUMMARY_KEYS plus val_max_tokens).

    bytes_total, steps, step_ms and tok_s come from the `final` line, falling back to the `artifact` line
    and the last train step (a run cut off before `final` still reports how far it got). eval_s is the sum
    over the post-training eval stages. val_max_tokens is the largest truncation among the final evals, or
    None when every eval saw the whole val set.
    """
    final = parsed["final"]
    last_step = parsed["train"][-1] if parsed["train"] else None
    evals_after_training = final_evals(parsed)
    eval_seconds = [record["eval_s"] for record in evals_after_training if is_number(record["eval_s"])]
    truncations = [record["val_max_tokens"] for record in evals_after_training if is_number(record["val_max_tokens"])]
    step_ms = first_present(field(final, "step_ms"), field(last_step, "step_ms"))
    return {
        "reported_stage": field(final, "stage"),
        "reported_bpb": field(final, "val_bpb"),
        "roundtrip_bpb": field(last_eval(parsed, "roundtrip"), "val_bpb"),
        "sliding_bpb": field(last_eval(parsed, "sliding"), "val_bpb"),
        "export_delta_bpb": field(parsed["export_cost"], "delta_bpb"),
        "bytes_total": first_present(field(final, "bytes_total"), field(parsed["artifact"], "bytes_total")),
        "steps": first_present(field(final, "steps"), field(last_step, "step")),
        "step_ms": step_ms,
        "tok_s": first_present(field(final, "tok_s"), field(last_step, "tok_s")),
        "tok_s_gpu": field(last_step, "tok_s_gpu"),
        "mfu": field(last_step, "mfu") if on_gpu(parsed) else None,
        "proj_8gpu_steps_600s": projected_steps(step_ms, parsed),
        "compile_s": parsed["compile_s"],
        "recompiles": field(parsed["compile_stats"], "recompiles_after_warmup"),
        "eval_s": round(sum(eval_seconds), 1) if eval_seconds else None,
        "eval_proj_8gpu_s": field(parsed["eval_projection"], "projected_s"),
        "val_max_tokens": max(truncations) if truncations else None,
    }


def on_gpu(parsed):
    """True when the `versions` line says the run was on CUDA (MFU and projections mean nothing on a CPU)."""
    return str(field(parsed["versions"], "device")).startswith("cuda")


def projected_steps(step_ms, parsed):
    """Optimizer steps in PROJECTION_TRAIN_S on PROJECTION_GPUS GPUs, from a run on `world_size` GPUs of the same
    kind with the same global batch: each GPU then runs world_size / PROJECTION_GPUS of the micro-batches, so a
    step takes step_ms * world_size / PROJECTION_GPUS (ideal scaling: gradient all-reduce not counted). None off
    the GPU or without the numbers."""
    world_size = field(parsed["versions"], "world_size")
    if not on_gpu(parsed) or not is_number(step_ms) or not is_number(world_size) or step_ms <= 0:
        return None
    return int(PROJECTION_TRAIN_S * 1000 / (step_ms * world_size / PROJECTION_GPUS))


def format_value(value):
    """Write a summary value: MISSING for None or NaN, else as the log wrote it (Python's shortest repr)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return str(value)


def summary_line(parsed, commit, variant):
    """The one-line proxy summary: `proxy roundtrip_bpb:... sliding_bpb:... ... commit:... variant:...`.

    ` val_max_tokens:N` is appended only when a final eval ran on a truncated val set, so such a number
    is never mistaken for a full-val score.
    """
    summary = summarize(parsed)
    tokens = ["proxy"] + [f"{key}:{format_value(summary[key])}" for key in SUMMARY_KEYS]
    tokens += [f"commit:{commit or MISSING}", f"variant:{variant or MISSING}"]
    if summary["val_max_tokens"] is not None:
        tokens.append(f"val_max_tokens:{summary['val_max_tokens']}")
    return " ".join(tokens)


def parse_summary_line(line):
    """Read a `proxy ...` summary line back into a dict (MISSING -> None); None if `line` is not one."""
    tokens = line.split()
    if not tokens or tokens[0] != "proxy":
        return None
    fields = parse_key_values(tokens[1:])
    if fields is None:
        return None
    return {key: (None if value == MISSING else value) for key, value in fields.items()}


def find_summary_line(text):
    """The last `proxy ...` summary line in `text`, parsed, or None."""
    for line in reversed(text.splitlines()):
        summary = parse_summary_line(line)
        if summary is not None:
            return summary
    return None


def main(arguments=None):
    """CLI: print the summary line (or the parsed JSON) of one log file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="trainer log file (logs/RUN_ID.txt)")
    parser.add_argument("--commit", default=MISSING, help="commit to print in the summary line")
    parser.add_argument("--variant", default=MISSING, help="variant name to print in the summary line")
    parser.add_argument("--json", action="store_true", help="print the whole parse as JSON instead")
    options = parser.parse_args(arguments)
    with open(options.log, encoding="utf-8", errors="replace") as log_file:
        parsed = parse_log(log_file.read())
    if options.json:
        print(json.dumps(parsed, indent=1))
    else:
        print(summary_line(parsed, options.commit, options.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
