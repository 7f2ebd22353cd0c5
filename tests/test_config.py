"""CONFIG: one table of env vars, presets as defaults only, early errors that name the variable."""
import pytest

import train_gpt
from conftest import REPO, tiny_hparams


def test_every_spec_variable_becomes_a_typed_attribute():
    """Each SPEC name maps to NAME.lower() with the default's type."""
    hp = train_gpt.Hyperparameters({})
    for name, default, _ in train_gpt.SPEC:
        value = getattr(hp, name.lower())
        if name not in ("SKC_LAYERS", "EMBED_DIM", "ROPE_DIMS", "EVAL_SEQ_LEN", "RUN_ID"):
            assert type(value) is type(default), name


def test_preset_changes_defaults_but_explicit_env_wins():
    """RUN_PRESET=smoke sets small defaults; an explicitly set variable overrides the preset."""
    hp = train_gpt.Hyperparameters({"RUN_PRESET": "smoke", "MODEL_DIM": "96"})
    assert hp.model_dim == 96 and hp.num_layers == train_gpt.PRESETS["smoke"]["NUM_LAYERS"]


@pytest.mark.parametrize("env, needle", [
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"MODEL_DIM": "100", "NUM_HEADS": "3"}, "MODEL_DIM"),
    ({"ARCHITECTURE": "transformerz"}, "ARCHITECTURE"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"NUM_LAYERS": "abc"}, "NUM_LAYERS"),
    ({"RUN_PRESET": "huge"}, "RUN_PRESET"),
    ({"EVAL_ONLY": "1"}, "ARTIFACT"),
    ({"SKC_LAYERS": "1,99"}, "SKC_LAYERS"),
    ({"NGRAM_ALPHA_MAX": "1"}, "NGRAM_ALPHA_MAX"),
    ({"EMA_HORIZON_FRACTION": "0"}, "EMA_HORIZON_FRACTION"),
    ({"LOSS_RUNAWAY_RATIO": "0.5"}, "LOSS_RUNAWAY_RATIO"),
    ({"EMA_DECAY": "0.997"}, "EMA_DECAY is no longer a setting: use EMA_HORIZON_FRACTION"),
    ({"TURBO_QUANT_EXPORT": "1"}, "TURBO_QUANT_EXPORT is no longer a setting: use TURBO_QUANT_TRAIN"),
])
def test_impossible_config_names_the_variable(env, needle):
    """An impossible config raises ConfigError whose message names the variable to fix."""
    with pytest.raises(train_gpt.ConfigError, match=needle):
        train_gpt.Hyperparameters(env)


def test_readme_documents_every_env_var():
    """README.md's env table lists every variable the trainer reads."""
    readme = (REPO / "README.md").read_text()
    missing = [name for name, _, _ in train_gpt.SPEC if f"`{name}`" not in readme]
    assert not missing, f"README.md lacks {missing}; regenerate with python train_gpt.py --env-table"


def test_grad_accum_must_divide_over_ranks():
    """GRAD_ACCUM_STEPS that does not split over the world size is refused."""
    hp = tiny_hparams(GRAD_ACCUM_STEPS=3)
    with pytest.raises(train_gpt.ConfigError, match="GRAD_ACCUM_STEPS"):
        train_gpt.grad_accum_steps(hp, train_gpt.Dist(world_size=2))
