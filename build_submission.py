"""Build the Parameter Golf submission: one self-contained train_gpt.py (dead code removed for one config,
minified, lzma-compressed, self-extracting) and the records folder around it.

  python build_submission.py --config best_known_competition.env --out records/<date>_<name>/ \\
      [--log logs/<run>.txt ...] [--submission-json artifacts/<run>/submission.json] [--skip-check]

build_code(source, config) is the whole source-to-bytes pipeline, a pure function of the trainer's source text and
a resolved config ({NAME: value}); this file never imports the trainer (it resolves a config by running
`train_gpt.py --print-config`), so the trainer can import build_code without a circle:
  parse -> fold conditions on config values -> drop statements after return/raise -> drop top-level definitions
  not reachable from the `if __name__ == "__main__"` block -> strip docstrings and the settings' help texts -> prune
  unused imports -> record the folded settings in FOLDED_SETTINGS -> unparse and compact whitespace -> compile
  check -> lzma -> text encoding -> a small wrapper that decodes and execs the code in its own module globals (so
  __name__ and __file__ are the script's own).
train_gpt.measure_code_bytes calls build_code at every training start, so it must stay fast (< 2 s) and depend
only on the source text and the resolved config: the bytes it counts are the bytes this tool writes.

Which values are folded. The config is resolved like a run resolves it (Config.as_dict(): every setting, set or
default), because measure_code_bytes only has that, where a value set in the file and a default look the same,
and both must give the same bytes. Settings are the fields of the trainer's config dataclasses (`name: type =
setting(default, help)`); a config read is `<section object>.name` (cfg, run_cfg, train_cfg, export_cfg, eval_cfg,
x.cfg, config.<section>). Every setting is folded except (a) those the tiny equivalence check overrides (model
size, schedule length, data and run paths: CHECK_SIZE_OVERRIDES, CHECK_RUN_KEYS), so the check runs the code paths
that were folded, and (b) those whose name the source assigns anywhere (`self.num_heads = ...`, or a keyword of a
`replace(...)` call), since their runtime value can differ from the configured one. The built script is
specialized to its config: the settings a folded condition read are written into its FOLDED_SETTINGS, and it
refuses an environment that sets one of them to another value (only (a) and (b) may differ).
"""
from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import datetime
import difflib
import functools
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
SHARED_DIR = REPO_DIR.parent / "shared"
BUDGET_BYTES = 16_000_000

# The tiny equivalence check (step 4) runs both scripts with these size knobs instead of the config's.
CHECK_SIZE_OVERRIDES = dict(
    NUM_LAYERS="2", MODEL_DIM="64", EMBED_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="64",
    TRAIN_BATCH_TOKENS="512", ITERATIONS="3", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0", BITNET_GROUP_SIZE="32",
    COMPILE="0", VAL_MAX_TOKENS="4096",
)
# ... and sets these to its own data, paths and logging.
CHECK_RUN_KEYS = ("RUN_ID", "LOG_DIR", "OUT_DIR", "DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE", "TRAIN_LOG_EVERY")
NEVER_FOLDED = frozenset(CHECK_SIZE_OVERRIDES) | frozenset(CHECK_RUN_KEYS)

# Attribute reads that mean "the config value NAME": cfg.NAME (and the other section parameter names), x.cfg.NAME
# (self.cfg, model.cfg, ctx.cfg), config.model.NAME (and the other sections). Setting names are unique over sections.
CONFIG_OBJECT_NAMES = ("cfg", "run_cfg", "train_cfg", "export_cfg", "eval_cfg")
CONFIG_SECTIONS = ("run", "model", "train", "export", "eval")
CONFIG_ROOT_NAME = "config"
SETTING_FUNCTION = "setting"          # a setting is `name: type = setting(default, help)` in a config dataclass
FOLDED_SETTINGS_NAME = "FOLDED_SETTINGS"
# Registry tables whose rows are Row(name, flag, ...) calls, `flag` the name of the setting that switches the row on:
# a row whose flag is folded off is dropped, so what only it references becomes unreachable and goes too.
REGISTRY_TABLES = ("EVAL_STAGES",)
# Registry dicts {"key": value, ...} of which a config reaches only some keys: SCHEMES those a QUANT_<CLASS> names,
# MIXERS the kinds of LAYER_KINDS, or of the ARCHITECTURE preset (ARCHITECTURE_KINDS, empty = attn). The other
# entries are dropped (and with them the classes only they reference) when every setting deciding it is folded.
SCHEME_SETTINGS = ("quant_attn", "quant_mlp", "quant_embed", "quant_other")

# lzma settings for source text: preset 6 compresses it as well as 9-extreme at half the time; lc=3, pb=0 (text
# has no 2^pb-byte alignment) was the smallest of lc 0-4 x pb 0/2 on train_gpt.py.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 6, "lc": 3, "lp": 0, "pb": 0}]


class BuildError(ValueError):
    """A config, source or check problem; the message names the key, file or step and the fix."""


@dataclasses.dataclass
class BuildResult:
    """What build produced: the submission bytes, the minified inner code, and what the passes did."""
    script: bytes
    code: str
    folded_keys: tuple
    folded_conditions: int
    removed_definitions: tuple


# -----------------------------------------------------------------------------------------------------------------
# CONFIG
# -----------------------------------------------------------------------------------------------------------------

def read_env_file(path):
    """KEY=VALUE lines of a shell env file, read like tools/load_env_file.sh: `#` starts a comment anywhere,
    `export ` is optional, one pair of surrounding quotes is removed."""
    values = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        line = line[len("export "):].strip() if line.startswith("export ") else line
        if not line:
            continue
        if "=" not in line:
            raise BuildError(f"{path}:{number}: {line!r} is not KEY=VALUE")
        key, value = (part.strip() for part in line.split("=", 1))
        for quote in ("\"", "'"):
            if len(value) >= 2 and value[0] == value[-1] == quote:
                value = value[1:-1]
        values[key] = value
    return values


def setting_calls(tree):
    """(field name, the setting(...) Call node) of every config field of the trainer, read from the AST."""
    found = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and isinstance(item.value, ast.Call) \
                    and isinstance(item.value.func, ast.Name) and item.value.func.id == SETTING_FUNCTION:
                found.append((item.target.id, item.value))
    return found


def spec_names_from_source(tree):
    """The env var names of the trainer's settings (field names in upper case), read from the AST (no import)."""
    return [name.upper() for name, _ in setting_calls(tree)]


def check_known_keys(keys, spec_names, where):
    """Every key must be a setting of the trainer: a typo'd variable is an error, never silently ignored."""
    for key in keys:
        if key not in spec_names:
            close = difflib.get_close_matches(key, spec_names, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see python train_gpt.py --env-table"
            raise BuildError(f"{where}: unknown config key {key!r}{hint}")


def resolve_config(env_values, source_path, spec_names):
    """Every setting's value as the trainer resolves it for this env (what Config.as_dict() gives in a run), by
    running `train_gpt.py --print-config` in a clean environment (no other setting may leak in)."""
    check_known_keys(env_values, spec_names, "config")
    source = Path(source_path).read_bytes()
    return dict(_resolved(json.dumps(env_values, sort_keys=True), str(source_path), hashlib.sha256(source).hexdigest()))


@functools.lru_cache(maxsize=16)
def _resolved(env_json, source_path, source_digest):
    """resolve_config's trainer run, once per (env, source text) in a process."""
    env = {key: value for key, value in os.environ.items() if key.lower() not in _setting_names(source_path)}
    env.update(json.loads(env_json))
    result = subprocess.run([sys.executable, source_path, "--print-config"], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"config: the trainer refused it: {message}")
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]).items())


def _setting_names(source_path):
    return {name for name, _ in setting_calls(ast.parse(Path(source_path).read_text()))}


# -----------------------------------------------------------------------------------------------------------------
# FOLD CONDITIONS ON CONFIG VALUES
# -----------------------------------------------------------------------------------------------------------------

def config_read_name(node):
    """NAME (lower case) if `node` reads a setting (see CONFIG_OBJECT_NAMES), else None."""
    if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
        return None
    owner = node.value
    if isinstance(owner, ast.Name) and owner.id in CONFIG_OBJECT_NAMES:
        return node.attr
    if isinstance(owner, ast.Attribute) and owner.attr in CONFIG_OBJECT_NAMES:
        return node.attr
    if (isinstance(owner, ast.Attribute) and owner.attr in CONFIG_SECTIONS and isinstance(owner.value, ast.Name)
            and owner.value.id == CONFIG_ROOT_NAME):
        return node.attr
    return None


def assigned_attribute_names(tree):
    """Names of every attribute the source stores or deletes anywhere (x.name = ..., x.name += ...,
    setattr(x, "name", ...)); None when some setattr outside an __init__ takes a computed name (then any
    attribute may change and nothing is folded)."""
    names, dynamic_calls = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "replace":
            names.update(keyword.arg for keyword in node.keywords if keyword.arg)  # dataclasses.replace(x, name=...)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and len(node.args) >= 2:
            if isinstance(node.args[1], ast.Constant):
                names.add(node.args[1].value)
            else:
                dynamic_calls.append(node)
    if dynamic_calls:
        in_init = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__"
                   for n in ast.walk(f)}
        if any(id(call) not in in_init for call in dynamic_calls):
            return None
    return names


def foldable_values(tree, config):
    """{lower name: value} of the config keys that may be folded (see the module docstring for the rule)."""
    if not config:
        return {}
    spec_names = spec_names_from_source(tree)
    if not spec_names:
        raise BuildError("the source declares no settings (`name: type = setting(default, help)`), so config keys cannot be checked or folded")
    check_known_keys(config, spec_names, "build_code config")
    assigned = assigned_attribute_names(tree)
    if assigned is None:
        return {}
    return {name.lower(): value for name, value in config.items()
            if name not in NEVER_FOLDED and name.lower() not in assigned and is_literal(value)}


def is_literal(value):
    """Values that can stand in the code as a constant: None, bool, numbers, strings, tuples of these."""
    if isinstance(value, tuple):
        return all(is_literal(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str, bytes))


COMPARISONS = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}  # `is` is not folded: identity of equal constants is not guaranteed
UNKNOWN = object()


def is_side_effect_free(node):
    """Names, constants, attribute reads and operators on them: dropping their evaluation changes nothing."""
    simple = (ast.Name, ast.Constant, ast.Attribute, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp,
              ast.Tuple, ast.List, ast.Load, ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
              ast.Slice)
    return all(isinstance(child, simple) for child in ast.walk(node))


def reads_argv(node):
    return (isinstance(node, ast.Attribute) and node.attr == "argv" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


class ConditionFolder(ast.NodeTransformer):
    """Replaces conditions decided by config values by their value, and decided if/else by the surviving branch.
    Only expressions whose value is certain are replaced; everything else is left exactly as written.
    The submission runs without command-line arguments, so `"--flag" in sys.argv` is decided too."""

    def __init__(self, values):
        self.values = values
        self.folded = 0
        self.read = set()  # settings whose value decided something (the built script refuses other values of them)

    def value_of(self, node):
        """The value of `node` if it is a constant or decided by config values, else UNKNOWN."""
        if isinstance(node, ast.Constant):
            return node.value
        name = config_read_name(node)
        if name is not None:
            if name in self.values:
                self.read.add(name)
            return self.values.get(name, UNKNOWN)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and not isinstance(getattr(node, "ctx", None), ast.Store):
            items = [self.value_of(item) for item in node.elts]
            if any(item is UNKNOWN for item in items):
                return UNKNOWN
            try:
                return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
            except TypeError:  # an unhashable item in a set
                return UNKNOWN
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            operand = self.value_of(node.operand)
            if operand is UNKNOWN:
                return UNKNOWN
            if isinstance(node.op, ast.Not):
                return not operand
            return -operand if isinstance(operand, (int, float)) else UNKNOWN
        if isinstance(node, ast.Compare):
            return self.compare_value(node)
        if isinstance(node, ast.BoolOp):
            return self.boolop_value(node)
        return UNKNOWN

    def compare_value(self, node):
        """a op1 b op2 c ...: False as soon as one pair with both sides known is false (the other operands are
        side-effect free); True when every pair is known and true."""
        operands = [node.left] + list(node.comparators)
        if len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)) and reads_argv(node.comparators[0]) \
                and isinstance(node.left, ast.Constant):
            return isinstance(node.ops[0], ast.NotIn)
        values = [self.value_of(operand) for operand in operands]
        all_known = True
        for op, left, right in zip(node.ops, values, values[1:]):
            if left is UNKNOWN or right is UNKNOWN:
                all_known = False
                continue
            if type(op) not in COMPARISONS:
                return UNKNOWN
            try:
                result = COMPARISONS[type(op)](left, right)
            except TypeError:
                return UNKNOWN
            if not result and all(is_side_effect_free(operand) for operand in operands):
                return False
        return True if all_known else UNKNOWN

    def boolop_value(self, node):
        """`a and b and ...` / `a or b or ...` with Python's value semantics, when the known operands decide it."""
        decisive = (lambda v: not v) if isinstance(node.op, ast.And) else bool
        for operand in node.values:
            value = self.value_of(operand)
            if value is UNKNOWN:
                return UNKNOWN
            if decisive(value):
                return value
        return value

    def constant(self, value, node):
        """A Constant for a decided value (an expression of a non-literal value stays as written)."""
        if not is_literal(value):
            return node
        self.folded += 1
        return ast.copy_location(ast.Constant(value=value), node)

    def visit_Compare(self, node):
        self.generic_visit(node)
        value = self.value_of(node)
        return node if value is UNKNOWN else self.constant(value, node)

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if not isinstance(node.op, ast.Not):
            return node
        value = self.value_of(node)
        return node if value is UNKNOWN else self.constant(value, node)

    def visit_BoolOp(self, node):
        """Decide it when possible; else drop operands that cannot change its value."""
        self.generic_visit(node)
        value = self.value_of(node)
        if value is not UNKNOWN:
            return self.constant(value, node)
        is_and = isinstance(node.op, ast.And)
        kept = []
        for index, operand in enumerate(node.values):
            value = self.value_of(operand)
            last = index == len(node.values) - 1
            if value is not UNKNOWN and not last:
                if bool(value) == is_and:
                    self.folded += 1
                    continue  # neutral operand (True in `and`, False in `or`)
                kept.append(operand)
                break  # decisive operand: nothing after it is ever evaluated
            kept.append(operand)
        if len(kept) == 1:
            return kept[0]
        node.values = kept
        return node

    def test_value(self, test):
        """Truthiness of a test: a decided value, or False when an `and` has a false operand and the rest are
        side-effect free (the value may differ, the truthiness may not)."""
        value = self.value_of(test)
        if value is not UNKNOWN:
            return bool(value)
        if isinstance(test, ast.BoolOp) and is_side_effect_free(test):
            values = [self.value_of(operand) for operand in test.values]
            if isinstance(test.op, ast.And) and any(v is not UNKNOWN and not v for v in values):
                return False
            if isinstance(test.op, ast.Or) and any(v is not UNKNOWN and v for v in values):
                return True
        return UNKNOWN

    def simplified_test(self, test):
        """A test without a trailing operand that cannot change its truthiness (`x and True` -> `x`)."""
        if isinstance(test, ast.BoolOp) and len(test.values) > 1:
            last = self.value_of(test.values[-1])
            if last is not UNKNOWN and bool(last) == isinstance(test.op, ast.And):
                self.folded += 1
                test.values = test.values[:-1]
                return test.values[0] if len(test.values) == 1 else test
        return test

    def fold_branch(self, node):
        """`if` / conditional expression: the surviving branch when the test is decided by the config."""
        self.generic_visit(node)
        decided = self.test_value(node.test)
        if decided is UNKNOWN:
            node.test = self.simplified_test(node.test)
            return node
        self.folded += 1
        return node.body if decided else node.orelse

    visit_If = visit_IfExp = fold_branch

    def visit_While(self, node):
        self.generic_visit(node)
        if self.test_value(node.test) is False:
            self.folded += 1
            return node.orelse
        return node



# -----------------------------------------------------------------------------------------------------------------
# DEAD STATEMENTS AND UNREACHABLE DEFINITIONS
# -----------------------------------------------------------------------------------------------------------------

STATEMENT_LISTS = ("body", "orelse", "finalbody")
TERMINATORS = (ast.Return, ast.Raise, ast.Break, ast.Continue)


def block_owners(tree):
    """Every node that holds statement lists (module, defs, if/for/while/with/try, handlers, match cases), found by
    walking statements only: expressions cannot contain statements, so this skips most of the tree."""
    owners, stack = [], [tree]
    while stack:
        node = stack.pop()
        owners.append(node)
        for field in STATEMENT_LISTS:
            for statement in getattr(node, field, None) or ():
                if isinstance(getattr(statement, "body", None), list):
                    stack.append(statement)
        stack.extend(getattr(node, "handlers", None) or ())
        stack.extend(getattr(node, "cases", None) or ())
    return owners


def statement_lists(owners):
    """(owner, field) of every statement list of the given block owners."""
    for owner in owners:
        for field in STATEMENT_LISTS:
            block = getattr(owner, field, None)
            if isinstance(block, list) and all(isinstance(item, ast.stmt) for item in block):
                yield owner, field


def edit_blocks(tree, edit):
    """Replace every statement list by edit(owner, field, statements)."""
    for owner, field in list(statement_lists(block_owners(tree))):
        setattr(owner, field, edit(owner, field, getattr(owner, field)))


def drop_statements_after_terminators(owner, field, block):
    """Statements after a return / raise / break / continue in the same block can never run."""
    for index, statement in enumerate(block):
        if isinstance(statement, TERMINATORS):
            return block[:index + 1]
    return block


def defined_names(statement):
    """Names a top-level statement defines, or None when it is not a pure definition (then it always stays)."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    targets = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
        targets = [statement.target]
    names = set()
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif not isinstance(node, (ast.Tuple, ast.List, ast.expr_context)):
                return None  # x.attr = ..., x[i] = ...: a side effect, not a definition
    return names or None


def referenced_names(node, top_level_names):
    """Names `node` uses: every identifier, `global` names, string constants equal to a top-level name
    (registries and getattr-by-name keep what they name), and "__doc__" when it reads a docstring."""
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            names.add(child.id)
        elif isinstance(child, ast.Attribute) and child.attr == "__doc__":
            names.add("__doc__")
        elif isinstance(child, (ast.Global, ast.Nonlocal)):
            names.update(child.names)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str) and child.value in top_level_names:
            names.add(child.value)
    return names


def remove_unreachable_definitions(tree):
    """Keep the top-level definitions reachable (transitively, by name) from `main` and from the statements that
    always run (the __main__ block, bare expressions, attribute assignments); drop the rest.
    Returns (names of the dropped definitions, every name the kept code uses)."""
    definitions = [(statement, defined_names(statement)) for statement in tree.body]
    top_level = set().union(*(names for _, names in definitions if names))
    references = [referenced_names(statement, top_level) for statement in tree.body]
    reachable, frontier = set(), {"main"} & top_level
    for (statement, names), refs in zip(definitions, references):
        if names is None:
            frontier |= refs
    while frontier:
        name = frontier.pop()
        if name in reachable:
            continue
        reachable.add(name)
        for (statement, names), refs in zip(definitions, references):
            if names and name in names:
                frontier |= refs - reachable
    kept, removed, used = [], [], set()
    for (statement, names), refs in zip(definitions, references):
        if names and not names & reachable:
            removed.append("/".join(sorted(names)))
        else:
            kept.append(statement)
            used |= refs
    tree.body = kept
    return tuple(removed), used


# -----------------------------------------------------------------------------------------------------------------
# DOCS AND IMPORTS
# -----------------------------------------------------------------------------------------------------------------

def is_bare_string(statement):
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and \
        isinstance(statement.value.value, str)


def strip_docstrings(owner, field, block):
    """Bare string statements (docstrings included) do nothing; they go."""
    return [statement for statement in block if not is_bare_string(statement)]


def blank_setting_help(tree):
    """A setting is setting(default, help); the help texts are documentation, so they become ""."""
    for _, call in setting_calls(tree):
        if len(call.args) >= 2 and isinstance(call.args[1], ast.Constant):
            call.args[1] = ast.Constant(value="")


def prune_registry_rows(tree, folder):
    """Drop the rows of REGISTRY_TABLES whose flag setting is folded to a false value (see REGISTRY_TABLES)."""
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in REGISTRY_TABLES for t in node.targets)
                and isinstance(node.value, (ast.Tuple, ast.List))):
            continue
        kept = []
        for row in node.value.elts:
            flag = row.args[1] if isinstance(row, ast.Call) and len(row.args) >= 2 else None
            name = flag.value if isinstance(flag, ast.Constant) and isinstance(flag.value, str) else None
            if name in folder.values:
                folder.read.add(name)
                if not folder.values[name]:
                    folder.folded += 1
                    continue
            kept.append(row)
        node.value.elts = kept


def registry_keys(tree, folder):
    """{registry name: the keys this config can reach} for the registry dicts, where every setting deciding them
    is folded."""
    values, keys = folder.values, {}
    if all(name in values for name in SCHEME_SETTINGS):
        keys["SCHEMES"] = {values[name] for name in SCHEME_SETTINGS}
        folder.read.update(SCHEME_SETTINGS)
    presets = next((ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "ARCHITECTURE_KINDS" for t in node.targets)), None)
    if presets is not None and "layer_kinds" in values and "architecture" in values:
        plan = values["layer_kinds"] or presets.get(values["architecture"] or "attn", "")
        if plan:
            keys["MIXERS"] = {kind.strip() for kind in plan.split(",")}
            folder.read.update(("layer_kinds", "architecture"))
    return keys


def prune_registry_dicts(tree, folder):
    """Drop the entries of the registry dicts (registry_keys) this config cannot reach."""
    reachable = registry_keys(tree, folder)
    for node in tree.body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and targets and targets[0] in reachable:
            pairs = [(k, v) for k, v in zip(node.value.keys, node.value.values)
                     if not isinstance(k, ast.Constant) or k.value in reachable[targets[0]]]
            folder.folded += len(node.value.keys) - len(pairs)
            node.value.keys, node.value.values = [k for k, _ in pairs], [v for _, v in pairs]


def record_folded_settings(tree, folder):
    """Write {NAME: value} of the settings a folded condition read into the trainer's FOLDED_SETTINGS assignment."""
    folded = {name.upper(): folder.values[name] for name in sorted(folder.read)}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == FOLDED_SETTINGS_NAME for t in node.targets):
            node.value = ast.parse(repr(folded), mode="eval").body
            return folded
    if folded:
        raise BuildError(f"the source has no top-level {FOLDED_SETTINGS_NAME} = {{}}, so the built script could not refuse "
                         "other values of the settings it was folded for")
    return folded


def unused_import_pruner(used):
    """An edit_blocks function dropping import aliases whose bound name is not in `used` (`from __future__`
    always stays; a bare `import a.b` binds `a`)."""
    def prune(owner, field, block):
        kept = []
        for statement in block:
            if isinstance(statement, (ast.Import, ast.ImportFrom)) and getattr(statement, "module", None) != "__future__":
                statement.names = [alias for alias in statement.names
                                   if alias.name == "*" or (alias.asname or alias.name.split(".")[0]) in used]
                if not statement.names:
                    continue
            kept.append(statement)
        return kept
    return prune


def fill_empty_block(owner, field, block):
    """A block emptied by the passes gets a `pass`; a `pass` beside other statements goes."""
    block = [statement for statement in block if not isinstance(statement, ast.Pass)]
    required = (field == "body" and not isinstance(owner, ast.Module)) or \
        (field == "finalbody" and isinstance(owner, ast.Try) and not owner.handlers)
    return block or ([ast.Pass()] if required else [])


# -----------------------------------------------------------------------------------------------------------------
# MINIFY
# ast.unparse writes one statement per line with 4-space indents and spaces around operators. compact_whitespace
# re-emits its tokens with 1-space indents and a space only where two tokens would otherwise merge; the result is
# accepted only if it compiles to the same bytecode (names, constants, nested code objects) as the plain unparse.
# -----------------------------------------------------------------------------------------------------------------

WORD_CHARACTER = re.compile(r"\w")


def needs_space(previous, current):
    """Two tokens need a space between them only when they would otherwise merge into one."""
    if previous is None:
        return False
    if WORD_CHARACTER.match(previous.string[-1]) and WORD_CHARACTER.match(current.string[0]):
        return True
    if previous.type == tokenize.NUMBER and current.string[0] == ".":
        return True
    return current.type == tokenize.STRING and previous.type in (tokenize.NAME, tokenize.NUMBER)


def compact_whitespace(source):
    """Re-emit the tokens of `source` with one space per indentation level and no optional spaces."""
    lines, current, previous, depth = [], [], None, 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.INDENT:
            depth += 1
        elif token.type == tokenize.DEDENT:
            depth -= 1
        elif token.type == tokenize.NEWLINE:
            lines.append(" " * depth + "".join(current))
            current, previous = [], None
        elif token.type not in (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING, tokenize.ENDMARKER):
            if needs_space(previous, token):
                current.append(" ")
            current.append(token.string)
            previous = token
    return "\n".join(lines) + "\n"


def bytecode_signature(code):
    """Everything of a code object that determines what it does, recursively; line and column tables excluded."""
    constants = tuple(bytecode_signature(c) if hasattr(c, "co_code") else
                      ("frozenset", tuple(sorted(map(repr, c)))) if isinstance(c, frozenset) else (type(c).__name__, repr(c))
                      for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_argcount,
            code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags, code.co_name, constants)


def compile_code(code):
    try:
        return compile(code, "train_gpt.py", "exec", dont_inherit=True)
    except SyntaxError as error:
        raise BuildError(f"the built code does not compile ({error}); this is a build_submission.py bug") from None


def minify(tree):
    """The tree as compact source, checked to compile to the same bytecode as ast.unparse's (else the plain
    unparse). This is also the build's compile check: a tree that does not compile is a BuildError."""
    plain = ast.unparse(tree)
    plain_bytecode = compile_code(plain)
    compact = compact_whitespace(plain)
    try:
        same = bytecode_signature(compile(compact, "train_gpt.py", "exec", dont_inherit=True)) == \
            bytecode_signature(plain_bytecode)
    except SyntaxError:
        same = False
    return compact if same else plain


def transformed_code(source, config=None):
    """The dead-code-eliminated, minified Python code for `config` (before compression), and pass statistics."""
    tree = ast.parse(source)
    folder = ConditionFolder(foldable_values(tree, config))
    tree = folder.visit(tree)
    prune_registry_rows(tree, folder)
    prune_registry_dicts(tree, folder)
    edit_blocks(tree, drop_statements_after_terminators)
    edit_blocks(tree, fill_empty_block)
    removed, used = remove_unreachable_definitions(tree)
    if "__doc__" not in used:
        edit_blocks(tree, strip_docstrings)
    blank_setting_help(tree)
    edit_blocks(tree, unused_import_pruner(used))
    record_folded_settings(tree, folder)
    edit_blocks(tree, fill_empty_block)
    code = minify(ast.fix_missing_locations(tree))
    return code, tuple(sorted(folder.values)), folder.folded, removed


# -----------------------------------------------------------------------------------------------------------------
# SELF-EXTRACTING WRAPPER
# The compressed code is stored as text. base85 costs 25%; BASE124 (every ASCII character that may stand raw in a
# triple-quoted string: not NUL, CR, backslash or the quote) costs 15%: each 256-byte chunk is one little-endian
# integer written as 295 base-124 digits, most significant first. The zero bytes the short last chunk gains
# follow the end of the lzma stream, where LZMADecompressor stops.
# -----------------------------------------------------------------------------------------------------------------

BASE124_ALPHABET = "".join(chr(c) for c in range(1, 128) if c not in (13, 34, 92))
BASE124_CHUNK_BYTES, BASE124_CHUNK_DIGITS = 256, 295
assert len(BASE124_ALPHABET) == 124 and 124 ** BASE124_CHUNK_DIGITS >= 256 ** BASE124_CHUNK_BYTES


def base124_encode(data):
    """bytes -> base-124 text in BASE124_ALPHABET (see the section comment); the last chunk uses only the digits
    its bytes need."""
    pieces = []
    for start in range(0, len(data), BASE124_CHUNK_BYTES):
        chunk = data[start:start + BASE124_CHUNK_BYTES]
        number = int.from_bytes(chunk, "little")
        digits_needed = BASE124_CHUNK_DIGITS if len(chunk) == BASE124_CHUNK_BYTES else \
            next(k for k in range(1, BASE124_CHUNK_DIGITS + 1) if 124 ** k >= 256 ** len(chunk))
        digits = []
        for _ in range(digits_needed):
            number, digit = divmod(number, 124)
            digits.append(BASE124_ALPHABET[digit])
        pieces.append("".join(reversed(digits)))
    return "".join(pieces)


BASE124_DECODER = (
    'import lzma\ns="""{text}"""\nd=b""\nfor i in range(0,len(s),295):\n n=0\n for c in s[i:i+295]:'
    'o=ord(c);n=n*124+o-1-(o>13)-(o>34)-(o>92)\n d+=n.to_bytes(256,"little")\nexec(lzma.LZMADecompressor().decompress(d))'
)
BASE85_DECODER = 'import lzma,base64\nexec(lzma.decompress(base64.b85decode("{text}")))'


def wrap(code):
    """The smallest self-extracting script for `code`: lzma in the .lzma container (the decoder needs no
    arguments; 13 header bytes, within a few bytes of raw LZMA2 with its longer decoder call), stored as base124
    or base85 text, whichever is shorter."""
    data = lzma.compress(code.encode(), format=lzma.FORMAT_ALONE, filters=LZMA_FILTERS)
    candidates = [BASE124_DECODER.replace("{text}", base124_encode(data)),
                  BASE85_DECODER.replace("{text}", base64.b85encode(data).decode())]
    return min(candidates, key=len).encode()


def build(source, config=None):
    """Source text + resolved config -> BuildResult (the submission script's exact bytes and statistics)."""
    code, folded_keys, folded_conditions, removed = transformed_code(source, config)
    return BuildResult(wrap(code), code, folded_keys, folded_conditions, removed)


def build_code(source: str, config: dict | None) -> bytes:
    """The exact bytes of the submission script build_submission.py writes for `config` ({NAME: value} of the
    trainer's settings, e.g. Config.as_dict()). Called by train_gpt.measure_code_bytes at every training start."""
    return build(source, config).script


# -----------------------------------------------------------------------------------------------------------------
# EQUIVALENCE CHECK
# The built script and the full train_gpt.py train the same tiny model on the same tiny data in fresh CPU
# processes; every logged train loss and the final val_bpb / val_loss must be identical.
# -----------------------------------------------------------------------------------------------------------------

def write_shard(path, tokens):
    """The one shard writer (data/tokenize_corpus.py), imported where the check needs it."""
    from data.tokenize_corpus import write_shard as write
    write(path, tokens)


def make_check_data(out_dir, tokenizer_path, corpus_path, documents=40, val_tokens=4096):
    """Tokenize the first `documents` documents of a JSONL corpus into one train and one val shard."""
    import numpy as np
    import sentencepiece as spm
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    with open(corpus_path) as lines:
        texts = [json.loads(line)["text"] for line, _ in zip(lines, range(documents))]
    stream = np.concatenate([[processor.bos_id()] + processor.encode(text) for text in texts]).astype(np.uint16)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_shard(out_dir / "fineweb_train_000000.bin", stream[:-val_tokens])
    write_shard(out_dir / "fineweb_val_000000.bin", stream[-val_tokens:])
    return out_dir


def check_environment(env_values, spec_names, data_path, tokenizer_path, vocab_size, work_dir):
    """Environment of one check run: the caller's environment without any setting (none may leak in), the
    config's own values, the tiny size knobs, the check data and paths."""
    env = {key: value for key, value in os.environ.items()
           if key not in spec_names and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_values)
    env.update(CHECK_SIZE_OVERRIDES)
    env.update(RUN_ID="check", LOG_DIR=str(work_dir / "logs"), OUT_DIR=str(work_dir / "out"), DATA_PATH=str(data_path),
               TOKENIZER_PATH=str(tokenizer_path), VOCAB_SIZE=str(vocab_size), TRAIN_LOG_EVERY="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def log_fields(text):
    """What the check compares, from a trainer's output: the train loss of every `train` line, and stage,
    val_loss and val_bpb (exact, as logged) of every `eval` line and of the `final` line."""
    losses, evals = [], []
    for line in text.splitlines():
        fields = dict(token.split(":", 1) for token in line.split()[1:] if ":" in token)
        if line.startswith("train ") and "train_loss" in fields:
            losses.append(fields.get("train_loss"))
        elif line.startswith(("eval ", "final ")):
            evals.append((line.split()[0], fields.get("stage"), fields.get("val_loss"), fields.get("val_bpb")))
    return losses, evals


def run_equivalence_check(script_bytes, source_path, env_values, spec_names, data_path, tokenizer_path, vocab_size,
                          timeout=600):
    """Run the built script and the full trainer (in parallel, fresh CPU processes) on the tiny config; raise
    BuildError unless both succeed with identical train losses and eval / final lines. Returns the built
    script's (losses, evals)."""
    with tempfile.TemporaryDirectory(prefix="build_check_") as work:
        work = Path(work)
        built_path = work / "built" / "train_gpt.py"  # alone in its folder, as in a records folder
        built_path.parent.mkdir()
        built_path.write_bytes(script_bytes)
        processes = {}
        for label, script in (("built", built_path), ("full", Path(source_path).resolve())):
            env = check_environment(env_values, spec_names, data_path, tokenizer_path, vocab_size, work / label)
            processes[label] = subprocess.Popen([sys.executable, str(script)], env=env, cwd=str(work),
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outputs = {label: process.communicate(timeout=timeout)[0] for label, process in processes.items()}
    for label, process in processes.items():
        if process.returncode != 0:
            raise BuildError(f"check: the {label} script failed (exit {process.returncode}):\n{outputs[label][-4000:]}")
    built, full = log_fields(outputs["built"]), log_fields(outputs["full"])
    if not built[0] or not any(kind == "final" for kind, *_ in built[1]):
        raise BuildError(f"check: the built script printed no step / final lines:\n{outputs['built'][-4000:]}")
    if built != full:
        raise BuildError(f"check: the built script does not reproduce the full script.\n built: losses {built[0]} "
                         f"evals {built[1]}\n full:  losses {full[0]} evals {full[1]}")
    return built


def shard_prefix(path, count):
    """The first `count` tokens of a challenge shard (header skipped)."""
    import numpy as np
    return np.fromfile(path, dtype="<u2", count=count, offset=256 * 4)


def slice_run_data(data_path, out_dir, train_tokens=32768, val_tokens=4097):
    """Tiny check shards cut from the run's own data: the first tokens of its first train and val shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_tokens), ("val", val_tokens)):
        first = sorted(Path(data_path).glob(f"fineweb_{split}_*.bin"))[0]
        write_shard(out_dir / f"fineweb_{split}_000000.bin", shard_prefix(first, count))
    return out_dir


def default_check_data(work_dir, resolved):
    """(data dir, tokenizer, vocab size) for the check: 40 FineWeb documents tokenized with ../shared's sp1024
    tokenizer; without ../shared, a slice of the run's own data (DATA_PATH / TOKENIZER_PATH / VOCAB_SIZE of the
    environment, else of the config)."""
    tokenizer = SHARED_DIR / "tokenizers" / "fineweb_1024_bpe.model"
    corpus = SHARED_DIR / "corpus" / "fineweb.train_1mb.jsonl"
    if tokenizer.is_file() and corpus.is_file():
        return make_check_data(work_dir / "check_data", tokenizer, corpus), tokenizer, 1024
    data_path = Path(os.environ.get("DATA_PATH") or resolved.get("DATA_PATH", ""))
    run_tokenizer = Path(os.environ.get("TOKENIZER_PATH") or resolved.get("TOKENIZER_PATH", ""))
    vocab_size = int(os.environ.get("VOCAB_SIZE") or resolved.get("VOCAB_SIZE", 0))
    if run_tokenizer.is_file() and all(any(data_path.glob(f"fineweb_{s}_*.bin")) for s in ("train", "val")):
        return slice_run_data(data_path, work_dir / "check_data"), run_tokenizer, vocab_size
    raise BuildError(f"check: no data; it needs {tokenizer} and {corpus}, or shards in DATA_PATH={data_path} with "
                     f"TOKENIZER_PATH={run_tokenizer}; or pass --check-data DIR --check-tokenizer PATH "
                     "--check-vocab-size N, or --skip-check")


# -----------------------------------------------------------------------------------------------------------------
# RECORDS FOLDER
# -----------------------------------------------------------------------------------------------------------------

def submission_record(submission_json, bytes_code, name, date, env_values, folded):
    """submission.json: the run's own (bytes_code set to the built script, bytes_total recomputed), or a stub with
    the config and the code bytes and no score (never a made-up number)."""
    if submission_json is None:
        return dict(name=name, date=date, val_bpb=None, val_loss=None, bytes_code=bytes_code, bytes_model=None,
                    bytes_total=None, config=env_values)
    record = json.loads(Path(submission_json).read_text())
    check_run_config(record.get("config", {}), folded, submission_json)
    record.setdefault("name", name)
    record.setdefault("date", date)
    record["bytes_code_measured_by_run"] = record.get("bytes_code")
    record["bytes_code"] = bytes_code
    if record.get("bytes_model") is not None:
        record["bytes_total"] = record["bytes_model"] + bytes_code
    return record


def check_run_config(run_config, folded, path):
    """The run must have used the values the script was folded for (its submission.json logs Config.as_dict())."""
    mismatched = [f"{name.upper()}: run {run_config[name.upper()]!r}, --config {value!r}"
                  for name, value in folded.items()
                  if name.upper() in run_config and json.loads(json.dumps(value)) != run_config[name.upper()]]
    if mismatched:
        raise BuildError(f"{path}: the run used other values than --config for variables the build folds: "
                         + "; ".join(mismatched) + ". Build with the config the run used.")


def records_readme(name, date, env_values, bytes_code, bytes_source, record, command, log_names, check_line):
    """README.md of a records folder: what it is, its score (only from the run's submission.json), the config,
    how it was built and checked, how to run it."""
    score = record.get("val_bpb")
    run_env = dict(env_values)
    run_env.setdefault("DATA_PATH", "./data/datasets/fineweb10B_sp8192")
    run_env.setdefault("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model")
    optional = lambda key: f"{record[key]:,}" if record.get(key) is not None else "n/a (no run submission.json given)"
    return "\n".join([
        f"# {name}", "",
        f"Date: {date}", "",
        f"- val_bpb: {score if score is not None else 'not measured here (no run submission.json was given)'}",
        f"- bytes_code: {bytes_code:,} (the built `train_gpt.py`; the full trainer source is {bytes_source:,} bytes)",
        f"- bytes_model: {optional('bytes_model')}",
        f"- bytes_total: {optional('bytes_total')} (limit {BUDGET_BYTES:,})",
        f"- logs: {', '.join(log_names) if log_names else 'none'}",
        f"- equivalence check: {check_line}", "",
        "## Config", "",
        "Variables not listed have the trainer's defaults (`python train_gpt.py --env-table` of the full trainer).", "",
        "```", *[f"{key}={value}" for key, value in env_values.items()], "```", "",
        "## How it was built", "",
        "```", command, "```", "",
        "`train_gpt.py` is the full trainer with the code this config cannot reach removed (conditions on its",
        "values folded, unreachable definitions, docstrings, comments and unused imports dropped), minified and",
        "lzma-compressed; it decompresses and runs itself. It is specialized to this config: run it with exactly",
        "these variables (model size, data and run paths may change; other variables were folded).", "",
        "## How to run it (8xH100)", "",
        "```", *[f"{key}={shlex.quote(value)} \\" for key, value in run_env.items()],
        "torchrun --standalone --nproc_per_node=8 train_gpt.py", "```", "",
    ])


def write_records(out_dir, script, record, readme, logs):
    """The records folder: train_gpt.py (the built script), submission.json, README.md, the train logs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_gpt.py").write_bytes(script)
    (out_dir / "submission.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    for log in logs:
        shutil.copyfile(log, out_dir / Path(log).name)
    (out_dir / "README.md").write_text(readme)


# -----------------------------------------------------------------------------------------------------------------
# MAIN
# -----------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="env file of KEY=VALUE lines (e.g. best_known_competition.env)")
    parser.add_argument("--out", required=True, help="records folder to write, e.g. records/2026-11-24_skc600/")
    parser.add_argument("--source", default=str(REPO_DIR / "train_gpt.py"), help="the full trainer")
    parser.add_argument("--log", action="append", default=[], help="train log to copy into the folder (repeatable)")
    parser.add_argument("--submission-json", help="the run's artifacts/<run>/submission.json")
    parser.add_argument("--skip-check", action="store_true", help="skip the tiny built-vs-full equivalence check")
    parser.add_argument("--check-data", help="directory of fineweb_{train,val}_*.bin for the check "
                                             "(default: made from ../shared with the sp1024 tokenizer)")
    parser.add_argument("--check-tokenizer", help="SentencePiece model of --check-data")
    parser.add_argument("--check-vocab-size", type=int, default=1024, help="vocab size of --check-data")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    return parser.parse_args(argv)


def check_inputs(args):
    """Fail before any work on a missing input or an occupied output folder."""
    out_dir = Path(args.out)
    if out_dir.exists() and any(out_dir.iterdir()) and not args.force:
        raise BuildError(f"--out {out_dir} exists and is not empty; choose a new folder or pass --force")
    for path in [args.config, args.source, *args.log, *filter(None, [args.submission_json])]:
        if not Path(path).is_file():
            raise BuildError(f"{path} does not exist")
    if args.check_data and not args.check_tokenizer:
        raise BuildError("--check-data needs --check-tokenizer (the SentencePiece model of those shards)")


def equivalence_check(args, script, source_path, env_values, resolved, spec_names):
    """Run the check on --check-data or on data made from ../shared; returns the README's one-line summary."""
    with tempfile.TemporaryDirectory(prefix="build_data_") as work:
        if args.check_data:
            data = (Path(args.check_data), Path(args.check_tokenizer), args.check_vocab_size)
        else:
            data = default_check_data(Path(work), resolved)
        losses, evals = run_equivalence_check(script, source_path, env_values, spec_names, *data)
    final = evals[-1]
    summary = (f"passed: built and full script, tiny config ({', '.join(f'{k}={v}' for k, v in CHECK_SIZE_OVERRIDES.items())}), "
               f"same train losses {', '.join(losses)} and {final[1]} val_bpb {final[3]}")
    print(f"check ok train_losses:{','.join(losses)} val_bpb:{final[3]} (built == full)")
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_inputs(args)
    out_dir, source_path = Path(args.out), Path(args.source)
    source = source_path.read_text()
    tree = ast.parse(source)
    spec_names = spec_names_from_source(tree)
    env_values = read_env_file(args.config)
    check_known_keys(env_values, spec_names, args.config)
    if env_values.get("RUN_PRESET"):
        raise BuildError(f"{args.config}: RUN_PRESET must be empty in a submission config (presets are for local runs)")
    resolved = resolve_config(env_values, source_path, spec_names)
    result = build(source, resolved)
    check_line = "skipped (--skip-check)"
    if not args.skip_check:
        check_line = equivalence_check(args, result.script, source_path, env_values, resolved, spec_names)
    name_match = re.match(r"(\d{4}-\d{2}-\d{2})_(.+)", out_dir.name)
    date = name_match.group(1) if name_match else datetime.date.today().isoformat()
    name = name_match.group(2) if name_match else out_dir.name
    folded = foldable_values(tree, resolved)
    record = submission_record(args.submission_json, len(result.script), name, date, env_values, folded)
    if record.get("bytes_total") and record["bytes_total"] > BUDGET_BYTES:
        raise BuildError(f"bytes_total {record['bytes_total']:,} exceeds the {BUDGET_BYTES:,}-byte limit")
    command = "python build_submission.py " + shlex.join(argv)
    readme = records_readme(name, date, env_values, len(result.script), len(source.encode()), record, command,
                            [Path(p).name for p in args.log], check_line)
    write_records(out_dir, result.script, record, readme, args.log)
    print(f"build folded_keys:{len(result.folded_keys)} folded_conditions:{result.folded_conditions} "
          f"removed:{','.join(result.removed_definitions) or '-'}")
    print(f"build bytes_code:{len(result.script)} bytes_source:{len(source.encode())} "
          f"dce_removed_defs:{len(result.removed_definitions)} path:{out_dir / 'train_gpt.py'}")


if __name__ == "__main__":
    try:
        main()
    except BuildError as error:
        print(f"build_submission: error: {error}", file=sys.stderr)
        sys.exit(1)
