"""Plot trainer logs side by side: train loss vs step (left), val BPB vs step (right).

The right panel draws the intermediate `eval stage:train_step` evals as lines and each run's final eval
stages (prequant, roundtrip, sliding, ...) as markers at the run's last step, one marker shape per stage.
The legend names the runs by log file name (logs/RUN_ID.txt -> RUN_ID).

Usage:
    python tools/plot_runs.py logs/a.txt logs/b.txt -o compare.png
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
from matplotlib.lines import Line2D  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import logparse  # noqa: E402  (the shared parser beside this file)

STAGE_MARKERS = {"prequant": "o", "roundtrip": "s", "sliding": "^", "ttt": "D", "ngram": "v", "evalengram": "P"}
OTHER_STAGE_MARKER = "X"


def last_step(parsed):
    """The run's last step: the `final` line's steps, else the last train or eval step, else 0."""
    final_steps = logparse.field(parsed["final"], "steps")
    if logparse.is_number(final_steps):
        return final_steps
    steps = [record["step"] for record in parsed["train"]]
    steps += [record["step"] for record in parsed["evals"] if logparse.is_number(record["step"])]
    return max(steps, default=0)


def points(records, x_key, y_key):
    """(xs, ys) of the records where both keys hold numbers."""
    pairs = [(record[x_key], record[y_key]) for record in records
             if logparse.is_number(record.get(x_key)) and logparse.is_number(record.get(y_key))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot_run(loss_axes, bpb_axes, name, parsed, color):
    """Draw one run on both panels in `color`; return the final stages it drew."""
    steps, losses = points(parsed["train"], "step", "train_loss")
    loss_axes.plot(steps, losses, color=color, linewidth=1.2, label=name)
    train_step_evals = [record for record in parsed["evals"] if record["stage"] == logparse.TRAIN_STEP_STAGE]
    eval_steps, eval_bpbs = points(train_step_evals, "step", "val_bpb")
    bpb_axes.plot(eval_steps, eval_bpbs, color=color, linewidth=1.2, marker=".", label=name)
    drawn_stages = []
    run_last_step = last_step(parsed)
    for record in logparse.final_evals(parsed):
        if not logparse.is_number(record["val_bpb"]):
            continue
        # Stages share the last step; shift each by 1.5% of it so their markers don't hide one another.
        offset = 0.015 * run_last_step * len(drawn_stages)
        step = (record["step"] if logparse.is_number(record["step"]) else run_last_step) + offset
        marker = STAGE_MARKERS.get(record["stage"], OTHER_STAGE_MARKER)
        bpb_axes.scatter([step], [record["val_bpb"]], color=color, marker=marker, s=45, zorder=3,
                         edgecolors="black", linewidths=0.5)
        drawn_stages.append(record["stage"])
    return drawn_stages


def plot_runs(log_paths, output_path, title=None):
    """Parse `log_paths` and write the two-panel comparison PNG to `output_path`."""
    figure, (loss_axes, bpb_axes) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    stages = []
    for index, log_path in enumerate(log_paths):
        parsed = logparse.parse_log(Path(log_path).read_text(encoding="utf-8", errors="replace"))
        for stage in plot_run(loss_axes, bpb_axes, Path(log_path).stem, parsed, colors[index % len(colors)]):
            if stage not in stages:
                stages.append(stage)
    loss_axes.set(title="train loss", xlabel="step", ylabel="train_loss")
    bpb_axes.set(title="val BPB (lines: during training; markers: final stages)", xlabel="step", ylabel="val_bpb")
    for axes in (loss_axes, bpb_axes):
        axes.grid(alpha=0.3)
    loss_axes.legend(fontsize=8)
    run_legend = bpb_axes.legend(fontsize=8, loc="upper right")
    if stages:
        bpb_axes.add_artist(run_legend)
        stage_handles = [Line2D([], [], color="gray", linestyle="", markeredgecolor="black",
                                marker=STAGE_MARKERS.get(stage, OTHER_STAGE_MARKER), label=stage) for stage in stages]
        bpb_axes.legend(handles=stage_handles, fontsize=8, loc="lower left", title="final stage", title_fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output_path, dpi=110)
    plt.close(figure)


def main(arguments=None):
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="trainer log files")
    parser.add_argument("-o", "--output", default="compare.png", help="PNG to write (default compare.png)")
    parser.add_argument("--title", help="figure title")
    options = parser.parse_args(arguments)
    plot_runs(options.logs, options.output, options.title)
    print(f"plot_runs: wrote {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
