"""The competition config fits: its predicted artifact plus the built code stays 3% (the estimate's tolerance)
under 16,000,000 bytes."""
import torch

import train_gpt
from build_submission import read_env_file
from conftest import REPO


def test_competition_config_fits_the_byte_budget():
    """Predicted artifact (zero-init matrices made random like trained ones) + built code <= 97% of the budget."""
    env = read_env_file(REPO / "best_known_competition.env")
    config = train_gpt.Config.from_env(env)
    model = train_gpt.GPT(config.model)
    predicted = train_gpt.estimate_artifact_bytes(model)
    code = train_gpt.measure_code_bytes(config.export, config.as_dict())
    print(f"budget predicted_model:{predicted} code:{code} total:{predicted + code}")
    assert predicted + code <= 0.97 * train_gpt.BUDGET_BYTES, f"{predicted + code:,} bytes leave no room for the estimate's 3% error"
    assert predicted + code >= 0.85 * train_gpt.BUDGET_BYTES, "the config leaves more than 15% of the budget unused"


def test_zero_initialized_layers_do_not_shrink_the_estimate():
    """The estimate treats all-zero (zero-init) matrices as trained ones: zeroing more layers leaves it in place."""
    from conftest import tiny_model
    model = tiny_model()
    before = train_gpt.estimate_artifact_bytes(model)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight.zero_()
    assert abs(train_gpt.estimate_artifact_bytes(model) - before) / before < 0.02
