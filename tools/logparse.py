"""Parse the trainer's `key:value` log into a dict, and format the proxy summary line.

The trainer (train_gpt.py) writes one line per event; the first token names the event and every other
token is `key:value`:

    step:100/5000 train_loss:3.2101 lr_scale:0.9500 step_ms:385.2 tok_s:1361234 elapsed_s:38.5 remaining_s:201.5
    compile_s:45.2
    model_params:73700000 ternary_params:70000000
    eval stage:roundtrip val_loss:2.3456 val_bpb:1.2345 eval_s:12.3 tokens:492263 [val_max_tokens:N]
    eval stage:train_step step:500 val_loss:... val_bpb:...
    artifact bytes_total:15800000 bytes_code:60000 bytes_model:15740000 path:...
    final val_bpb:1.2345 val_loss:2.3456 stage:sliding bytes_total:... steps:620 step_ms:385.0 tok_s:...

The parser is tolerant: unknown lines (the trainer also logs its own source, nvidia-smi, the config) are
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

# Stages that run after training, in the order the trainer runs them (stage names from the trainer's log).
FINAL_EVAL_STAGES = ("prequant", "roundtrip", "sliding", "ttt", "ngram", "evalengram")
# The stage name of the periodic evals during training.
TRAIN_STEP_STAGE = "train_step"
# The keys of the summary line, in print order (commit and variant are appended last).
SUMMARY_KEYS = ("roundtrip_bpb", "sliding_bpb", "bytes_total", "steps", "step_ms", "tok_s", "compile_s", "eval_s")
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
    return {
        "train": [],
        "evals": [],
        "artifact": None,
        "final": None,
        "compile_s": None,
        "model": None,
    }


def parse_log(text):
    """Parse a trainer log into a dict.

    Keys:
      train     list of train-step dicts (step, total_steps, train_loss, lr_scale, step_ms, tok_s, elapsed_s,
                remaining_s, plus any extra keys), in log order
      evals     list of eval dicts (stage, step, val_loss, val_bpb, eval_s, tokens, val_max_tokens, ...),
                intermediate `train_step` evals and final stages alike, in log order
      artifact  dict of the `artifact` line (bytes_total, bytes_code, bytes_model, path) or None
      final     dict of the `final` line or None
      compile_s the `compile_s:` value or None
      model     dict of the `model_params:` line (model_params, ternary_params, ...) or None
    A repeated single event (artifact, final, compile_s, model) keeps its last occurrence.
    """
    parsed = empty_parse()
    for line in text.splitlines():
        tokens = line.split()
        if not tokens or line[0].isspace():
            continue
        event = tokens[0]
        if event.startswith("step:"):
            record = parse_step_line(tokens)
            if record is not None:
                parsed["train"].append(record)
        elif event == "eval":
            record = parse_eval_line(tokens)
            if record is not None:
                parsed["evals"].append(record)
        elif event in ("artifact", "final"):
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
    return {
        "roundtrip_bpb": field(last_eval(parsed, "roundtrip"), "val_bpb"),
        "sliding_bpb": field(last_eval(parsed, "sliding"), "val_bpb"),
        "bytes_total": first_present(field(final, "bytes_total"), field(parsed["artifact"], "bytes_total")),
        "steps": first_present(field(final, "steps"), field(last_step, "step")),
        "step_ms": first_present(field(final, "step_ms"), field(last_step, "step_ms")),
        "tok_s": first_present(field(final, "tok_s"), field(last_step, "tok_s")),
        "compile_s": parsed["compile_s"],
        "eval_s": round(sum(eval_seconds), 1) if eval_seconds else None,
        "val_max_tokens": max(truncations) if truncations else None,
    }


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
