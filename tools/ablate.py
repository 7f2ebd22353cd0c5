"""Ablation runner: run each variant of a variants file through tools/proxy_bench.sh and append the results.

A variants file has one variant per line, `name: ENV1=a ENV2=b` (no env for the baseline), with `#` comments
and blank lines allowed:

    baseline:
    sliding_stride_64: SLIDING_EVAL_STRIDE=64   # stride of the sliding-window eval

The variants run one after another. Before each, the runner checks the time left of --time-budget-s: a
variant is started only when the time left is at least the last run's duration (and the run is stopped at
the budget's end), so one device command of 10 minutes never loses its results to the hard stop. Each
finished run's `proxy ...` summary line becomes a row of the results table in docs/results.md:

    | date | commit | device | variant | env | reported_stage | reported_bpb | roundtrip_bpb | sliding_bpb | ... | command |

(every key of logparse.SUMMARY_KEYS but compile_s / recompiles / tok_s; see RESULT_COLUMNS).

On the GPU machine the rows land in the device's copy of the repo, so they are also written to
$OUT/results_rows.md; back here, `python tools/ablate.py --import-rows FILE` appends them to docs/results.md.
The device's copy has no .git: pass the commit in (`PROXY_COMMIT=$(git rev-parse --short HEAD)` or --commit).

`--env-file FILE` runs every variant on top of FILE (e.g. best_known_competition.env: variants of the
competition config) through proxy_bench's PROXY_ENV_FILE; the row's command says so.

Usage:
    python tools/ablate.py tools/variants/example.txt --time-budget-s 570        # on the 1xH100 machine
    python tools/ablate.py tools/variants/competition.txt --env-file best_known_competition.env --only competition
    python tools/ablate.py tools/variants/example.txt --dry-run --only baseline  # CPU smoke run here
    python tools/ablate.py --import-rows /path/to/results_rows.md
"""

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import logparse  # noqa: E402  (the shared parser beside this file)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_PATH = REPO_ROOT / "docs" / "results.md"
DEFAULT_PROXY_BENCH = REPO_ROOT / "tools" / "proxy_bench.sh"
SUMMARY_COLUMNS = (
    "reported_stage", "reported_bpb", "roundtrip_bpb", "sliding_bpb", "export_delta_bpb", "bytes_total", "steps",
    "step_ms", "tok_s_gpu", "mfu", "proj_8gpu_steps_600s", "eval_s", "eval_proj_8gpu_s",
)
RESULT_COLUMNS = ("date", "commit", "device", "variant", "env") + SUMMARY_COLUMNS + ("command",)
RESULTS_HEADER = "| " + " | ".join(RESULT_COLUMNS) + " |"
RESULTS_SEPARATOR = "|" + "|".join("---" for _ in RESULT_COLUMNS) + "|"
DRY_RUN_DEVICE = "cpu-dry-run"
ROWS_FILE_NAME = "results_rows.md"
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------------------------------------------------
# Variants file
# ---------------------------------------------------------------------------------------------------------

def parse_variants(text):
    """Parse a variants file into a list of (name, env dict) in file order.

    Raises ValueError naming the line for a malformed line, a bad name, a token that is not ENV=value,
    or a repeated variant name.
    """
    variants = []
    seen_names = set()
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, rest = line.partition(":")
        name = name.strip()
        if not colon or not VARIANT_NAME.match(name):
            raise ValueError(f"line {line_number}: expected 'name: ENV=value ...' with a name of letters, "
                             f"digits, '_', '.', '-', got {line!r}")
        if name in seen_names:
            raise ValueError(f"line {line_number}: variant {name!r} is defined twice")
        seen_names.add(name)
        env = {}
        for token in shlex.split(rest, comments=True):
            key, equals, value = token.partition("=")
            if not equals or not ENV_NAME.match(key):
                raise ValueError(f"line {line_number}: {token!r} is not ENV=value")
            env[key] = value
        variants.append((name, env))
    return variants


def format_env(env):
    """ENV dict -> `A=1 B=2`, shell-quoted where needed."""
    return " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())


# ---------------------------------------------------------------------------------------------------------
# Results table
# ---------------------------------------------------------------------------------------------------------

def table_cell(value):
    """A markdown table cell: None -> NA, pipes escaped, newlines flattened."""
    if value is None or value == "":
        return logparse.MISSING
    return str(value).replace("|", "\\|").replace("\n", " ")


def code_cell(text):
    """A cell holding code (env, command) in backticks, or NA when empty."""
    return f"`{text}`" if text else logparse.MISSING


def results_row(summary, date, commit, device, variant, env, command):
    """One markdown row of the results table from a parsed summary line."""
    values = {
        "date": date, "commit": commit, "device": device, "variant": variant,
        "env": code_cell(format_env(env)), "command": code_cell(command),
    }
    for key in SUMMARY_COLUMNS:
        values[key] = logparse.format_value(summary.get(key))
    if summary.get("val_max_tokens") is not None:
        for key in ("reported_bpb", "roundtrip_bpb"):
            values[key] = f"{values[key]} (val_max_tokens:{summary['val_max_tokens']})"
    return "| " + " | ".join(table_cell(values[column]) for column in RESULT_COLUMNS) + " |"


def is_results_row(line):
    """True for a data row with exactly the results table's column count."""
    stripped = line.strip()
    if not stripped.startswith("|") or not stripped.endswith("|") or stripped in (RESULTS_HEADER, RESULTS_SEPARATOR):
        return False
    cells = re.split(r"(?<!\\)\|", stripped)[1:-1]
    return len(cells) == len(RESULT_COLUMNS) and not set(stripped) <= set("|-: ")


def append_row(results_path, row, header=RESULTS_HEADER):
    """Insert `row` after the last line of the table whose header line is `header` in `results_path`."""
    lines = Path(results_path).read_text(encoding="utf-8").splitlines()
    if header not in lines:
        raise ValueError(f"{results_path} has no results table header line:\n{header}")
    insert_at = lines.index(header) + 1
    while insert_at < len(lines) and lines[insert_at].lstrip().startswith("|"):
        insert_at += 1
    lines.insert(insert_at, row)
    Path(results_path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def import_rows(rows_path, results_path):
    """Append the result rows of `rows_path` (e.g. $OUT/results_rows.md from the device) not already present."""
    present = set(Path(results_path).read_text(encoding="utf-8").splitlines())
    imported = 0
    for line in Path(rows_path).read_text(encoding="utf-8").splitlines():
        if is_results_row(line) and line not in present:
            append_row(results_path, line)
            present.add(line)
            imported += 1
    return imported


# ---------------------------------------------------------------------------------------------------------
# Environment facts: commit and device
# ---------------------------------------------------------------------------------------------------------

def git_commit(repo_root=REPO_ROOT):
    """`git rev-parse --short HEAD`, plus `-dirty` when tracked files are modified; None outside a git repo."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=repo_root, capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def detect_device():
    """`1xNVIDIA H100 80GB HBM3` from nvidia-smi, or `unknown` when there is none."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    names = [name.strip() for name in names if name.strip()]
    return f"{len(names)}x{names[0]}" if names else "unknown"


# ---------------------------------------------------------------------------------------------------------
# Running one variant
# ---------------------------------------------------------------------------------------------------------

def run_proxy_bench(command, environment, time_limit_s):
    """Run `command`, echoing its output live; return (exit status, output text, seconds taken).

    The run gets its own process group and is stopped (SIGTERM, then SIGKILL) when it passes
    `time_limit_s`; the exit status is then 124, as with timeout(1).
    """
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output_lines = []
    echo_thread = threading.Thread(target=echo_output, args=(process.stdout, output_lines))
    echo_thread.start()
    try:
        status = process.wait(timeout=max(time_limit_s, 1))
    except subprocess.TimeoutExpired:
        print(f"ablate: stopping the run at the budget's end ({time_limit_s:.0f}s)", flush=True)
        stop_process_group(process)
        status = 124
    echo_thread.join()
    return status, "".join(output_lines), time.monotonic() - start


def echo_output(stream, output_lines):
    """Copy `stream` line by line to stdout and into `output_lines` until it closes."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        output_lines.append(line)


def stop_process_group(process):
    """SIGTERM the run's process group, SIGKILL it after 10 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run_variants(variants, options):
    """Run the variants under the time budget; append a row per finished run. Returns the failures' count."""
    commit = options.commit or os.environ.get("PROXY_COMMIT") or git_commit() or "unknown"
    device = DRY_RUN_DEVICE if options.dry_run else (options.device or detect_device())
    output_dir = os.environ.get("OUT")
    budget_start = time.monotonic()
    last_duration_s = options.expected_run_s
    failures = 0
    for index, (name, env) in enumerate(variants):
        remaining_s = options.time_budget_s - (time.monotonic() - budget_start)
        if remaining_s < last_duration_s:
            skipped = ", ".join(skipped_name for skipped_name, _ in variants[index:])
            print(f"ablate: {remaining_s:.0f}s left < last run {last_duration_s:.0f}s: not run: {skipped}")
            break
        arguments = ["bash", str(options.proxy_bench)] + (["--dry-run"] if options.dry_run else [])
        arguments += [f"{key}={value}" for key, value in env.items()]
        prefix = [f"PROXY_ENV_FILE={shlex.quote(options.env_file)}"] if options.env_file else []
        command_text = " ".join(prefix + ["bash", "tools/proxy_bench.sh"] + [shlex.quote(a) for a in arguments[2:]])
        environment = dict(os.environ, PROXY_VARIANT=name, PROXY_COMMIT=commit,
                           PROXY_DEADLINE_S=str(int(min(remaining_s - 5, options.proxy_deadline_s))))
        if options.env_file:
            environment["PROXY_ENV_FILE"] = options.env_file
        print(f"ablate: [{index + 1}/{len(variants)}] {name}: {command_text} ({remaining_s:.0f}s left)", flush=True)
        status, output, last_duration_s = run_proxy_bench(arguments, environment, remaining_s)
        summary = logparse.find_summary_line(output)
        if status != 0 or summary is None:
            failures += 1
            print(f"ablate: {name} failed (exit status {status}); no row written")
            continue
        date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        row = results_row(summary, date, commit, device, name, env, command_text)
        append_row(options.results, row)
        if output_dir:
            with open(Path(output_dir) / ROWS_FILE_NAME, "a", encoding="utf-8") as rows_file:
                rows_file.write(row + "\n")
        print(f"ablate: appended to {options.results}:\n{row}", flush=True)
    return failures


def main(arguments=None):
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants_file", nargs="?", help="file of `name: ENV=value ...` lines")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants, in file order")
    parser.add_argument("--time-budget-s", type=float, default=570.0,
                        help="stop starting variants past this many seconds in all (default 570)")
    parser.add_argument("--expected-run-s", type=float, default=0.0,
                        help="duration assumed for the first variant's budget check (default 0: always run it)")
    parser.add_argument("--proxy-deadline-s", type=float, default=585.0,
                        help="upper bound passed to proxy_bench as PROXY_DEADLINE_S (default 585)")
    parser.add_argument("--dry-run", action="store_true", help="CPU dry run of proxy_bench; rows say cpu-dry-run")
    parser.add_argument("--env-file", help="KEY=VALUE file every variant runs on top of (proxy_bench's PROXY_ENV_FILE)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS_PATH, help="results markdown file")
    parser.add_argument("--commit", help="commit for the rows (default PROXY_COMMIT or git)")
    parser.add_argument("--device", help="device for the rows (default from nvidia-smi)")
    parser.add_argument("--proxy-bench", type=Path, default=DEFAULT_PROXY_BENCH, help=argparse.SUPPRESS)
    parser.add_argument("--import-rows", type=Path, metavar="FILE",
                        help="append the rows of FILE (a results_rows.md from the device) and exit")
    options = parser.parse_args(arguments)

    if options.import_rows:
        count = import_rows(options.import_rows, options.results)
        print(f"ablate: imported {count} row(s) into {options.results}")
        return 0
    if not options.variants_file:
        parser.error("a variants file is required (or --import-rows FILE)")
    if options.env_file and not Path(options.env_file).is_file():
        parser.error(f"--env-file {options.env_file} is not a file")
    variants = parse_variants(Path(options.variants_file).read_text(encoding="utf-8"))
    if options.only:
        unknown = set(options.only) - {name for name, _ in variants}
        if unknown:
            parser.error(f"--only names not in {options.variants_file}: {', '.join(sorted(unknown))}")
        variants = [(name, env) for name, env in variants if name in options.only]
    return 1 if run_variants(variants, options) else 0


if __name__ == "__main__":
    sys.exit(main())
