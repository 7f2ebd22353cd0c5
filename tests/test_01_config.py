"""CONFIG: each setting declared once (a section field), presets as defaults only, early errors naming the variable,
README's table derived from the fields, the built script refusing settings it was folded for."""
import dataclasses

import pytest

import train_gpt
from conftest import REPO, tiny_config


def test_every_setting_is_one_typed_field_of_one_section():
    """Each env var is the upper-cased name of exactly one field, read with its default's type."""
    config = train_gpt.Config.from_env({})
    names = [f.name.upper() for _, f in train_gpt.env_fields()]
    assert len(names) == len(set(names)), "a setting is declared twice"
    for section, f in train_gpt.env_fields():
        value = getattr(getattr(config, section), f.name)
        assert type(value) is type(f.default) and value == f.default, f.name
    assert set(config.as_dict()) == set(names)


def test_env_values_are_cast_to_the_fields_types():
    """'8' becomes int 8, '0.5' float, and an int field accepts '3.0'; a non-number is refused naming the variable."""
    config = train_gpt.Config.from_env({"NUM_LAYERS": "3.0", "MLP_MULT": "3", "SKC_LAYERS": "1,2", "ARCHITECTURE": "competition"})
    assert config.model.num_layers == 3 and config.model.mlp_mult == 3.0 and config.model.skc_layer_indices == (1, 2)
    with pytest.raises(train_gpt.ConfigError, match="NUM_LAYERS='abc'"):
        train_gpt.Config.from_env({"NUM_LAYERS": "abc"})


def test_derived_values_are_properties_not_rewrites():
    """EMBED_DIM=0, ROPE_DIMS=0 and EVAL_SEQ_LEN=0 stay 0 in the config (and the artifact); the widths they stand
    for are properties."""
    config = train_gpt.Config.from_env({"MODEL_DIM": "96", "NUM_HEADS": "4", "TRAIN_SEQ_LEN": "128"})
    assert (config.model.embed_dim, config.model.rope_dims, config.eval.eval_seq_len) == (0, 0, 0)
    assert (config.model.embed_width, config.model.rotary_dims, config.model.head_dim, config.eval_seq_len) == (96, 24, 24, 128)


def test_preset_changes_defaults_but_explicit_env_wins():
    """RUN_PRESET=smoke sets small defaults; an explicitly set variable overrides the preset."""
    config = train_gpt.Config.from_env({"RUN_PRESET": "smoke", "MODEL_DIM": "96"})
    assert config.model.model_dim == 96 and config.model.num_layers == train_gpt.PRESETS["smoke"]["NUM_LAYERS"]
    assert "MODEL_DIM" in config.explicit and "NUM_LAYERS" not in config.explicit


def test_replace_revalidates():
    """Config.replace changes one section's fields and validates the result."""
    config = tiny_config()
    assert config.replace("run", data_path="x").run.data_path == "x"
    with pytest.raises(train_gpt.ConfigError, match="NUM_KV_HEADS"):
        config.replace("model", num_kv_heads=3)


@pytest.mark.parametrize("env, needle", [
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"MODEL_DIM": "100", "NUM_HEADS": "3"}, "MODEL_DIM"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"NUM_LAYERS": "abc"}, "NUM_LAYERS"),
    ({"RUN_PRESET": "huge"}, "RUN_PRESET"),
    ({"EVAL_ONLY": "1"}, "ARTIFACT"),
    ({"SKC_LAYERS": "1,99"}, "SKC_LAYERS"),
    ({"SKC_LAYERS": "1,x"}, "SKC_LAYERS"),
    ({"NGRAM_ALPHA_MAX": "1"}, "NGRAM_ALPHA_MAX"),
    ({"EMA_HORIZON_FRACTION": "0"}, "EMA_HORIZON_FRACTION"),
    ({"LOSS_RUNAWAY_RATIO": "0.5"}, "LOSS_RUNAWAY_RATIO"),
    ({"TRAIN_DATA_RESERVE_SECONDS": "-2"}, "TRAIN_DATA_RESERVE_SECONDS"),
    ({"EVAL_ENGRAM_ORDERS": "1,2"}, "EVAL_ENGRAM_ORDERS"),
    ({"CAPSULE_CARRY_EVAL": "1"}, "CAPSULE_CARRY_EVAL"),
    ({"EMA_DECAY": "0.997"}, "EMA_DECAY is no longer a setting: use EMA_HORIZON_FRACTION"),
    ({"TURBO_QUANT_EXPORT": "1"}, "TURBO_QUANT_EXPORT is no longer a setting: use TURBO_QUANT_TRAIN"),
    ({"KOOPMAN_RANK": "4"}, "KOOPMAN_RANK is no longer a setting: use CAPSULE_KOOPMAN_RANK"),
])
def test_impossible_config_names_the_variable(env, needle):
    """An impossible config raises ConfigError whose message names the variable to fix."""
    with pytest.raises(train_gpt.ConfigError, match=needle):
        train_gpt.Config.from_env(env)


def test_readme_table_is_generated_from_the_fields():
    """README.md's env table is exactly env_table_markdown() (python tools/update_readme_env_table.py writes it)."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- env-table:start -->\n", 1)[1].split("\n<!-- env-table:end -->", 1)[0]
    assert table == train_gpt.env_table_markdown(), "README's env table is stale: run python tools/update_readme_env_table.py"
    assert all(f"`{f.name.upper()}`" in table for _, f in train_gpt.env_fields())


def test_folded_settings_refuse_another_value(monkeypatch):
    """A built script holds the settings it was folded for (FOLDED_SETTINGS): the same value passes, another value
    is an error naming the variable and the fix; unset it keeps its (folded) default."""
    monkeypatch.setattr(train_gpt, "FOLDED_SETTINGS", {"EVAL_ONLY": 0, "SLIDING_EVAL": 1})
    assert train_gpt.Config.from_env({"EVAL_ONLY": "0", "SLIDING_EVAL": "1"}).run.eval_only == 0
    with pytest.raises(train_gpt.ConfigError, match="EVAL_ONLY='1': this submission script was built for EVAL_ONLY=0"):
        train_gpt.Config.from_env({"EVAL_ONLY": "1", "ARTIFACT": "x"})


def test_artifact_config_of_older_versions_maps_to_todays_fields():
    """A stored model config with renamed keys (koopman_rank), list-valued SKC_LAYERS and unknown keys loads."""
    stored = dataclasses.asdict(train_gpt.ModelConfig())
    stored.update(koopman_rank=3, skc_layers=[1, 2], architecture="competition", some_old_key=1)
    del stored["capsule_koopman_rank"]
    cfg = train_gpt.ModelConfig.from_artifact(stored)
    assert cfg.capsule_koopman_rank == 3 and cfg.skc_layer_indices == (1, 2)
