"""build_submission.py: config -> dead-code-eliminated, minified, self-extracting submission script + records folder.

The pass tests use a small synthetic trainer (SYNTHETIC) so they do not depend on train_gpt.py's current features;
the contract tests (compiles, size, speed, equivalence) use the real train_gpt.py with the competition config.
test_slow_* runs two tiny trainings (about 20 s); `pytest -k "not slow"` skips it.
"""
import ast
import io
import json
import lzma
import os
import random
import subprocess
import sys
import time
import tokenize

import pytest

import build_submission
from build_submission import BuildError, build, build_code
from conftest import REPO

COMPETITION_ENV = REPO / "best_known_competition.env"

SYNTHETIC = '''"""A tiny trainer-shaped program: settings as config dataclass fields, flag-guarded features, main."""
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields


def setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    use_extra: int = setting(0, "1 = run the extra feature")
    mode: str = setting("plain", "plain | fancy")
    num_layers: int = setting(2, "layers (a size knob the check overrides: never folded)")
    renamed: str = setting("a", "a variable the program itself reassigns: never folded")


FOLDED_SETTINGS = {}


def read_config():
    """Every setting from the environment; a folded setting set to another value is refused."""
    values = {f.name: type(f.default)(os.environ.get(f.name.upper(), f.default)) for f in fields(RunConfig)}
    for name, value in FOLDED_SETTINGS.items():
        if name in os.environ and values[name.lower()] != value:
            raise SystemExit(f"{name}: this script was built for {value!r}")
    return RunConfig(**values)


def extra_feature():
    """Only reachable when USE_EXTRA=1."""
    return math.sqrt(16.0)


def fancy_label():
    return "fancy"


def env_table():
    return json.dumps([f.name.upper() for f in fields(RunConfig)])


KINDS = {"plain": str}


def main():
    if "--env-table" in sys.argv:
        print(env_table())
        return
    run_cfg = read_config()
    # a comment that must not survive
    if run_cfg.use_extra:
        print("extra", extra_feature())
    label = fancy_label() if run_cfg.mode == "fancy" else KINDS["plain"]("plain")
    if run_cfg.num_layers > 1 and run_cfg.mode in ("plain", "fancy"):
        print("layers", run_cfg.num_layers)
    if run_cfg.renamed == "a":
        run_cfg.renamed = "b"
    print(label, run_cfg.renamed)


if __name__ == "__main__":
    main()
'''


def run_script(path, env=None, cwd=None):
    """Run a script in a fresh interpreter; returns its stdout lines (fails the test on a non-zero exit)."""
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, str(path)], env=full_env, cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def competition_config():
    """The competition env file resolved exactly as a training run resolves it (Config.as_dict()), by the trainer."""
    names = build_submission.spec_names_from_source(ast.parse((REPO / "train_gpt.py").read_text()))
    return build_submission.resolve_config(build_submission.read_env_file(COMPETITION_ENV), REPO / "train_gpt.py", names)


@pytest.fixture(scope="module")
def trainer_source():
    return (REPO / "train_gpt.py").read_text()


# --- the passes, on the synthetic program ----------------------------------------------------------------------

def test_dce_removes_a_function_reachable_only_behind_a_disabled_flag():
    """USE_EXTRA=0 and MODE=plain: extra_feature, fancy_label and the imports only they used are gone."""
    code = build(SYNTHETIC, {"USE_EXTRA": 0, "MODE": "plain"}).code
    assert "extra_feature" not in code and "fancy_label" not in code
    assert "import math" not in code and "run_cfg.use_extra" not in code


def test_dce_keeps_the_function_when_the_flag_is_enabled():
    """USE_EXTRA=1: extra_feature and its import stay, and the built script runs it."""
    result = build(SYNTHETIC, {"USE_EXTRA": 1, "MODE": "plain"})
    assert "def extra_feature" in result.code and "import math" in result.code
    assert "run_cfg.use_extra" not in result.code  # the test itself was decided


def test_without_a_config_nothing_is_folded():
    """build_code(source, None) only strips and minifies: every feature stays."""
    code = build(SYNTHETIC, None).code
    assert "def extra_feature" in code and "def fancy_label" in code and "run_cfg.use_extra" in code


def test_size_knobs_and_reassigned_variables_are_never_folded():
    """NUM_LAYERS (the check overrides it) and RENAMED (the program assigns run_cfg.renamed) keep their conditions."""
    code = build(SYNTHETIC, {"USE_EXTRA": 0, "MODE": "plain", "NUM_LAYERS": 2, "RENAMED": "a"}).code
    assert "run_cfg.num_layers>1" in code.replace(" ", "")
    assert "run_cfg.renamed=='a'" in code.replace(" ", "")


def test_comparisons_with_literals_are_folded():
    """`run_cfg.mode == "fancy"` and `run_cfg.mode in (...)` are decided; the ternary keeps only its surviving branch."""
    code = build(SYNTHETIC, {"MODE": "plain"}).code
    assert "run_cfg.mode" not in code and "KINDS['plain']('plain')" in code


def test_registry_dict_keeps_what_it_names():
    """A dict that survives keeps the classes / functions its values name (KINDS -> str is a builtin; the dict
    itself stays because main reads it)."""
    source = SYNTHETIC.replace('KINDS = {"plain": str}', 'def plain_kind(x):\n    return x\n\n\nKINDS = {"plain": plain_kind}')
    code = build(source, {"MODE": "plain"}).code
    assert "KINDS=" in code.replace(" ", "") and "def plain_kind" in code


def test_argv_flag_branch_and_its_helpers_are_dropped():
    """The submission runs without arguments: the `--env-table` branch and env_table() (and json) go."""
    code = build(SYNTHETIC, {"MODE": "plain"}).code
    assert "--env-table" not in code and "env_table" not in code and "import json" not in code


def test_docstrings_and_comments_are_gone():
    """No docstring, bare string statement or comment survives; the settings' help texts become ''."""
    code = build(SYNTHETIC, {"MODE": "plain"}).code
    assert '"""' not in code and "docstring" not in code.lower() and "a comment" not in code
    assert "plain | fancy" not in code and "mode:str=setting('plain','')" in code.replace(" ", "")


def test_unused_imports_are_pruned():
    """json and math are used only by removed code: their imports go; os and sys stay."""
    code = build(SYNTHETIC, {"USE_EXTRA": 0, "MODE": "plain"}).code
    imports = {alias.name for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Import) for alias in node.names}
    assert imports == {"os"}  # sys was only read by the dropped --env-table branch


def test_built_synthetic_program_behaves_like_the_source(tmp_path):
    """Same output from the built script and the source for the config it was built for."""
    (tmp_path / "source.py").write_text(SYNTHETIC)
    (tmp_path / "built.py").write_bytes(build_code(SYNTHETIC, {"USE_EXTRA": 1, "MODE": "fancy"}))
    env = {"USE_EXTRA": "1", "MODE": "fancy"}
    assert run_script(tmp_path / "built.py", env) == run_script(tmp_path / "source.py", env) == \
        ["extra 4.0", "layers 2", "fancy b"]


def test_built_script_records_and_enforces_the_settings_it_was_folded_for(tmp_path):
    """The settings a folded condition read go into FOLDED_SETTINGS (a size knob the check overrides does not); the
    built script runs with them unset or equal and refuses another value, naming the variable."""
    result = build(SYNTHETIC, {"USE_EXTRA": 0, "MODE": "plain", "NUM_LAYERS": 2, "RENAMED": "a"})
    assert "FOLDED_SETTINGS={'MODE':'plain','USE_EXTRA':0}" in result.code.replace(" ", "")
    (tmp_path / "built.py").write_bytes(result.script)
    assert run_script(tmp_path / "built.py", {"USE_EXTRA": "0"}) == ["layers 2", "plain b"]
    refused = subprocess.run([sys.executable, str(tmp_path / "built.py")], env=dict(os.environ, USE_EXTRA="1"),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "USE_EXTRA: this script was built for 0" in refused.stderr


def test_unknown_config_key_is_an_error():
    """A typo'd variable is an error naming it (and the likely intended one), never silently ignored."""
    with pytest.raises(BuildError, match="NUM_LAYER'.*NUM_LAYERS"):
        build_code(SYNTHETIC, {"NUM_LAYER": 3})


def test_unknown_key_in_the_config_file_fails_the_cli(tmp_path):
    """The CLI exits non-zero and names the key before doing any work."""
    env_file = tmp_path / "bad.env"
    env_file.write_text("# comment\nexport ARCHITECTURE=attn\nMODEL_DIMS='768'\n")
    result = subprocess.run([sys.executable, str(REPO / "build_submission.py"), "--config", str(env_file),
                             "--out", str(tmp_path / "out"), "--skip-check"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "MODEL_DIMS" in result.stderr and "MODEL_DIM?" in result.stderr
    assert not (tmp_path / "out").exists()


def test_env_file_reader_matches_the_shell_loader(tmp_path):
    """`export`, comments, blank lines and one pair of quotes are handled like tools/load_env_file.sh."""
    env_file = tmp_path / "x.env"
    env_file.write_text("# header\n\nexport A=1\nB='two words'  # note\nC=\"3\"\n")
    assert build_submission.read_env_file(env_file) == {"A": "1", "B": "two words", "C": "3"}


# --- the wrapper -----------------------------------------------------------------------------------------------

def test_wrapper_runs_as_main_with_its_own_file(tmp_path):
    """The self-extracting script sees __name__ == "__main__" and __file__ == its own path."""
    source = "import sys\nprint(__name__)\nprint(__file__)\n"
    path = tmp_path / "records" / "train_gpt.py"
    path.parent.mkdir()
    path.write_bytes(build_code(source, None))
    assert run_script(path, cwd=tmp_path) == ["__main__", str(path)]


def test_base124_text_round_trips_any_bytes():
    """Every byte string survives base124 text inside the wrapper (all 124 digits, partial last chunks)."""
    rng = random.Random(0)
    alphabet = build_submission.BASE124_ALPHABET
    assert eval('"""' + alphabet + '"""') == alphabet  # each digit stands raw in a triple-quoted string
    for size in (1, 255, 256, 257, 3000):
        payload = bytes(rng.randrange(256) for _ in range(size))
        data = lzma.compress(f"RESULT = {payload!r}\n".encode(), format=lzma.FORMAT_ALONE)
        wrapper = build_submission.BASE124_DECODER.replace("{text}", build_submission.base124_encode(data))
        namespace = {}
        exec(compile(wrapper, "wrapper", "exec"), namespace)
        assert namespace["RESULT"] == payload


# --- the real trainer ------------------------------------------------------------------------------------------

def test_built_code_compiles(trainer_source, competition_config):
    """The inner code and the self-extracting script of the competition build both compile, and the script is
    plain ASCII (valid UTF-8) Python."""
    result = build(trainer_source, competition_config)
    compile(result.code, "train_gpt.py", "exec")
    compile(result.script, "train_gpt.py", "exec")
    result.script.decode("ascii")
    assert len(result.script) < len(trainer_source.encode()) / 3


def test_built_trainer_has_no_docstrings_or_comments(trainer_source, competition_config):
    """No comment token and no docstring anywhere in the competition build."""
    code = build(trainer_source, competition_config).code
    assert not [t for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            assert ast.get_docstring(node) is None, getattr(node, "name", "module")


def test_build_code_is_fast(trainer_source, competition_config):
    """build_code runs at every training start: under 2 s for the whole trainer."""
    start = time.perf_counter()
    build_code(trainer_source, competition_config)
    assert time.perf_counter() - start < 2.0


def test_code_bytes_the_run_counts_equal_the_written_file(tmp_path, trainer_source, competition_config):
    """train_gpt.measure_code_bytes (what a training run charges) == build_code's length == the size of the
    train_gpt.py the CLI writes."""
    import train_gpt
    out = tmp_path / "2026-01-01_size"
    build_submission.main(["--config", str(COMPETITION_ENV), "--out", str(out), "--skip-check"])
    written = (out / "train_gpt.py").stat().st_size
    config = train_gpt.Config.from_env(build_submission.read_env_file(COMPETITION_ENV))
    assert train_gpt.measure_code_bytes(config.export, config.as_dict()) == len(build_code(trainer_source, competition_config)) == written
    record = json.loads((out / "submission.json").read_text())
    assert record["bytes_code"] == written and record["val_bpb"] is None
    assert "skipped" in (out / "README.md").read_text()


def test_submission_json_of_a_run_gets_the_built_code_bytes(tmp_path, competition_config):
    """--submission-json: bytes_code is the built script's size and bytes_total is recomputed; val_bpb is kept."""
    run_json = tmp_path / "submission.json"
    run_json.write_text(json.dumps(dict(val_bpb=1.2345, bytes_code=99, bytes_model=15_000_000, bytes_total=15_000_099,
                                        config={k: v for k, v in competition_config.items() if k != "SKC_LAYERS"})))
    log = tmp_path / "run.txt"
    log.write_text("final val_bpb:1.2345\n")
    out = tmp_path / "2026-01-01_run"
    build_submission.main(["--config", str(COMPETITION_ENV), "--out", str(out), "--skip-check",
                           "--submission-json", str(run_json), "--log", str(log)])
    record = json.loads((out / "submission.json").read_text())
    size = (out / "train_gpt.py").stat().st_size
    assert record["val_bpb"] == 1.2345 and record["bytes_code"] == size and record["bytes_total"] == 15_000_000 + size
    assert (out / "run.txt").is_file() and "1.2345" in (out / "README.md").read_text()


def test_submission_json_of_a_run_with_other_folded_values_is_refused(tmp_path, competition_config):
    """A run trained with SLIDING_EVAL=0 cannot be submitted with a script folded for SLIDING_EVAL=1."""
    run_json = tmp_path / "submission.json"
    run_json.write_text(json.dumps(dict(val_bpb=1.0, bytes_model=1, config=dict(SLIDING_EVAL=0))))
    with pytest.raises(BuildError, match="SLIDING_EVAL"):
        build_submission.main(["--config", str(COMPETITION_ENV), "--out", str(tmp_path / "o"), "--skip-check",
                               "--submission-json", str(run_json)])


def test_check_fails_loudly_when_the_built_script_differs(tmp_path):
    """Different losses, or a built script that crashes, are BuildErrors (the CLI exits non-zero)."""
    full = tmp_path / "full.py"
    full.write_text("print('train step:1 train_loss:1.0000')\nprint('final val_bpb:1.5000 val_loss:2.0000 stage:roundtrip')\n")
    different = b"print('train step:1 train_loss:1.0001')\nprint('final val_bpb:1.5000 val_loss:2.0000 stage:roundtrip')\n"
    with pytest.raises(BuildError, match="does not reproduce"):
        build_submission.run_equivalence_check(different, full, {}, [], tmp_path, tmp_path, 1024)
    with pytest.raises(BuildError, match="built script failed"):
        build_submission.run_equivalence_check(b"raise SystemExit(3)\n", full, {}, [], tmp_path, tmp_path, 1024)
    same = full.read_bytes()
    assert build_submission.run_equivalence_check(same, full, {}, [], tmp_path, tmp_path, 1024)[0] == ["1.0000"]


def test_check_data_falls_back_to_a_slice_of_the_run_data(tmp_path, monkeypatch):
    """Without ../shared, the check cuts tiny shards from the run's own DATA_PATH (its first tokens); without
    either, it is an error naming both and --check-data / --skip-check."""
    import numpy as np
    monkeypatch.setattr(build_submission, "SHARED_DIR", tmp_path / "no_shared")
    data, tokenizer = tmp_path / "run_data", tmp_path / "tok.model"
    data.mkdir()
    tokenizer.write_bytes(b"sp")
    tokens = np.arange(50_000) % 1000
    for split in ("train", "val"):
        build_submission.write_shard(data / f"fineweb_{split}_000000.bin", tokens)
    monkeypatch.setenv("DATA_PATH", str(data))
    monkeypatch.setenv("TOKENIZER_PATH", str(tokenizer))
    monkeypatch.setenv("VOCAB_SIZE", "1000")
    check_dir, check_tokenizer, vocab = build_submission.default_check_data(tmp_path / "work", {})
    assert (check_tokenizer, vocab) == (tokenizer, 1000)
    val = build_submission.shard_prefix(check_dir / "fineweb_val_000000.bin", 10**6)
    assert len(val) == 4097 and list(val[:3]) == [0, 1, 2]
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "missing"))
    with pytest.raises(BuildError, match="--skip-check"):
        build_submission.default_check_data(tmp_path / "work2", {})


def test_slow_built_script_reproduces_the_full_trainer_on_a_tiny_config(tmp_path, tiny_data, own_tokenizer):
    """End to end: the CLI builds the competition config, runs the built and the full script on the tiny config
    (same train losses, same eval and final lines, exact BPB) and writes the records folder."""
    out = tmp_path / "2026-01-01_e2e"
    result = subprocess.run([sys.executable, str(REPO / "build_submission.py"), "--config", str(COMPETITION_ENV),
                             "--out", str(out), "--check-data", str(tiny_data), "--check-tokenizer", str(own_tokenizer),
                             "--check-vocab-size", "1024"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "check ok" in result.stdout and "build bytes_code:" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "submission.json", "train_gpt.py"]
    assert "passed" in (out / "README.md").read_text()


def test_built_trainer_refuses_a_folded_setting_set_otherwise(tmp_path, trainer_source, competition_config):
    """The competition build folds EVAL_ONLY=0 (its eval-only branch is gone): EVAL_ONLY=1 is refused before any work,
    naming EVAL_ONLY, instead of training a new model."""
    result = build(trainer_source, competition_config)
    assert "'EVAL_ONLY':0" in result.code.replace(" ", "")
    (tmp_path / "train_gpt.py").write_bytes(result.script)
    run = subprocess.run([sys.executable, str(tmp_path / "train_gpt.py")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, EVAL_ONLY="1", ARTIFACT="x.skc", CUDA_VISIBLE_DEVICES=""))
    assert run.returncode != 0 and "EVAL_ONLY='1': this submission script was built for EVAL_ONLY=0" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "logs").exists()


def test_eval_rows_whose_flag_is_folded_off_are_dropped_with_their_code(trainer_source, competition_config):
    """The eval table's rows of switched-off stages go, and with them their scorers and hooks; switched on, they stay."""
    plain = build(trainer_source, competition_config).code
    assert "class TestTimeTrainer" not in plain and "def score_stream" not in plain and "class NgramCache" not in plain
    with_ttt = build(trainer_source, dict(competition_config, TTT_ENABLED=1)).code
    assert "class TestTimeTrainer" in with_ttt and "def score_stream" in with_ttt and "class NgramCache" not in with_ttt


def test_build_tool_and_trainer_do_not_import_each_other():
    """build_submission.py resolves a config by running the trainer (--print-config), never by importing it; the
    trainer imports only build_code from it (to count its code bytes)."""
    build_tree = ast.parse((REPO / "build_submission.py").read_text())
    imported = {alias.name for node in ast.walk(build_tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(build_tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "train_gpt" not in imported and "importlib" not in imported
    trainer_tree = ast.parse((REPO / "train_gpt.py").read_text())
    from_build = [node for node in ast.walk(trainer_tree) if isinstance(node, ast.ImportFrom) and node.module == "build_submission"]
    assert [alias.name for node in from_build for alias in node.names] == ["build_code"]


def test_registry_entries_the_config_cannot_reach_are_dropped(trainer_source, competition_config):
    """The competition config (attention layers, ternary blocks, fp8 embedding) keeps only the attn mixer and the
    ternary and fp8 schemes: the SKC / Koopman mixers, their scan and the int-k code go."""
    code = build(trainer_source, competition_config).code
    assert "class SKCMixer" not in code and "def chunked_scan" not in code and "class KoopmanSSM" not in code
    assert "class IntScheme" not in code and "'ternary':TernaryScheme()" in code.replace(" ", "")
    mixed = build(trainer_source, dict(competition_config, QUANT_ATTN="int6", LAYER_KINDS="attn,skc,attn,attn,attn,attn,attn,attn,attn,attn",
                                       ARCHITECTURE="")).code
    assert "class IntScheme" in mixed and "class SKCMixer" in mixed and "class KoopmanSSM" not in mixed
