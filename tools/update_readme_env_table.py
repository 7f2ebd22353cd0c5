"""Regenerate the env-var table of README.md from the trainer's config fields (between the env-table markers)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402

START, END = "<!-- env-table:start -->", "<!-- env-table:end -->"


def main():
    readme = REPO / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{train_gpt.env_table_markdown()}\n{END}{tail}")
    print(f"README.md: {len(train_gpt.env_fields())} env vars")


if __name__ == "__main__":
    main()
