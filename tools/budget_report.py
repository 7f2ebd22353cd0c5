"""Byte report of a config before any training: exact payload bytes per tensor class of its model (the codes and
scales of trained weights have the same sizes), the built submission's code bytes, and the total against 16 MB.
The payload of the initial weights is NOT a bound: zero-initialized output projections pack and compress to
almost nothing; the predicted line (estimate_artifact_bytes, zero-init matrices made random) is the one to read.

    python tools/budget_report.py --config best_known_competition.env [--compress] [KEY=VALUE ...]

KEY=VALUE pairs override the file (e.g. QUANT_ATTN=int6 NUM_LAYERS=11), to size a variant before writing it down.
"""
import argparse
import lzma
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402
from build_submission import read_env_file  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "best_known_competition.env"))
    parser.add_argument("--compress", action="store_true", help="also lzma-compress the initial weights (slow)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings over the file's")
    args = parser.parse_args()
    env = read_env_file(args.config)
    for pair in args.overrides:
        key, equals, value = pair.partition("=")
        if not equals:
            parser.error(f"{pair!r} is not KEY=VALUE")
        env[key] = value
    config = train_gpt.Config.from_env(env)
    model = train_gpt.GPT(config.model)
    train_gpt.round_scalars_to_fp16(model)  # as the trainer does before export
    payload = train_gpt.serialize_model(model)
    code = train_gpt.measure_code_bytes(config.export, config.as_dict())
    counts = {r: sum(p.numel() for p in model.parameters() if p.route == r) for r in train_gpt.PARAM_ROUTES}
    print("| item | bytes |\n|---|---|")
    for kind, size in sorted(train_gpt.export_report(model).items()):
        print(f"| {kind} | {size:,} |")
    header = len(payload) - sum(train_gpt.export_report(model).values())
    print(f"| header + magic | {header:,} |\n| payload total | {len(payload):,} |\n| code (built submission) | {code:,} |")
    print(f"| **payload + code** | **{len(payload) + code:,}** of {train_gpt.BUDGET_BYTES:,} |")
    predicted = train_gpt.estimate_artifact_bytes(model, config.export)
    print(f"| predicted artifact (estimate_artifact_bytes) + code | {predicted + code:,} |")
    if args.compress:
        print(f"| lzma-6 of the initial weights + code | {1 + len(lzma.compress(payload, preset=6)) + code:,} |")
    print("\nparameters: " + ", ".join(f"{r} {n:,}" for r, n in counts.items()))


if __name__ == "__main__":
    main()
