"""The competition config fits: its exact uncompressed payload plus the built code is <= 16,000,000 bytes."""
from pathlib import Path

import train_gpt
from conftest import REPO


def read_env_file(path):
    env = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip().removeprefix("export ").strip()
        if line:
            key, value = line.split("=", 1)
            env[key] = value.strip().strip("'\"")
    return env


def test_competition_config_fits_the_byte_budget():
    """Compression only shrinks the trit-packed payload, so payload bytes + code bytes bound the artifact."""
    env = read_env_file(REPO / "best_known_competition.env")
    hp = train_gpt.Hyperparameters(env)
    model = train_gpt.GPT(train_gpt.ModelConfig.from_hparams(hp))
    payload = len(train_gpt.serialize_model(model)) + 1  # + codec byte
    code = train_gpt.measure_code_bytes(hp)
    print(f"budget payload:{payload} code:{code} total:{payload + code}")
    assert payload + code <= train_gpt.BUDGET_BYTES, f"{payload + code:,} bytes > {train_gpt.BUDGET_BYTES:,}"
    assert payload + code >= 0.85 * train_gpt.BUDGET_BYTES, "the config leaves more than 15% of the budget unused"
