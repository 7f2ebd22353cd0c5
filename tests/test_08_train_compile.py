"""TRAIN: torch.compile health on the CPU. Dynamo traces the training forward of every architecture and option
in one graph (no graph break), and the compiled model does not recompile as the training fraction moves (ramps,
router warm-up, stochastic depth read a buffer, not a Python value). The inductor backend needs a GPU to be worth
timing; tracing is the same on the CPU, so these compile with a backend that only counts the graphs it is given.
Two-layer models: every feature is present, and tracing takes half the time of four layers."""
import pytest
import torch

import train_gpt
from conftest import perturbed_model

TWO_LAYERS = dict(NUM_LAYERS=2)
CONFIGS = {
    "attn": dict(ARCHITECTURE="attn"),
    "skc": dict(ARCHITECTURE="skc", SKC_AUX_ENTROPY_FRACTION=0.1, SKC_PARALLEL_RESIDUAL=1, SKC_AMP_RAMP_FRACTION=0.5),
    "koopman_ssm": dict(ARCHITECTURE="koopman_ssm"),
    "hybrid_shared_vrl": dict(ARCHITECTURE="hybrid", SHARED_BLOCKS=2, VRL_ENABLED=1),
    "competition_options": dict(ARCHITECTURE="competition", SKC_LAYERS="1", PARALLEL_RESIDUAL_START=1, XSA_START_LAYER=1,
                                STOCHASTIC_DEPTH=0.2, TERNARY_NOISE_SCALE=0.1, TURBO_QUANT_TRAIN=1, QUANT_EMBED="fp8"),
    "addons": dict(BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64, ENGRAM_NUM_ORDERS=3, CAPSULE_ENABLED=1, CAPSULE_NUM=4,
                   KOOPMAN_SPECULATIVE_STEPS=2, KOOPMAN_HALT_THRESHOLD=0.01, FEEDBACK_ENABLED=1, FEEDBACK_PASSES=2,
                   MOE_ENABLED=1, MOE_NUM_EXPERTS=3, MOE_TOP_K=2, MOE_START_FRACTION=0.3),
}


def _batch():
    torch.manual_seed(0)
    return torch.randint(0, 1024, (2, 32)), torch.randint(0, 1024, (2, 32))


class GraphCounter:
    """A torch.compile backend that runs each graph eagerly and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def compiled_sweep(model, fractions):
    """Compile `model` (dynamic=False), then forward + backward at each training fraction; returns the graph count
    after each step."""
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(model, dynamic=False, backend=counter)
    x, y = _batch()
    counts = []
    for fraction in fractions:
        model.set_progress(fraction)
        compiled(x, y).backward()
        counts.append(counter.graphs)
    return counts


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_forward_is_one_graph_that_never_recompiles(name):
    """One graph for the training loss (a graph break would make two) and still one after the training fraction
    went 0 -> 1 in six steps (a recompile would add one)."""
    model = perturbed_model(**TWO_LAYERS, **CONFIGS[name]).train()
    assert compiled_sweep(model, (0.0, 0.1, 0.3, 0.5, 0.9, 1.0)) == [1] * 6


def test_depth_recurrence_switch_is_the_one_recompile():
    """RECURRENCE_START_FRACTION flips a Python flag: exactly one more graph when it switches on, none after."""
    model = perturbed_model(**TWO_LAYERS, RECURRENCE_LAYERS="1", RECURRENCE_START_FRACTION=0.5).train()
    assert compiled_sweep(model, (0.0, 0.2, 0.6, 0.9)) == [1, 1, 2, 2]


def test_compile_stats_count_recompiles_after_warmup():
    """A new input shape after the warm-up is a recompile, and the compile_stats line counts it."""
    f = torch.compile(lambda x: (x * 2).sum(), dynamic=False, backend="eager")
    f(torch.ones(3))
    after_warmup = train_gpt.compiled_frames()
    f(torch.ones(3))
    lines = []
    train_gpt.log_compile_stats(lines.append, after_warmup)
    assert "recompiles_after_warmup:0" in lines[0]
    f(torch.ones(7))
    train_gpt.log_compile_stats(lines.append, after_warmup)
    assert "recompiles_after_warmup:1" in lines[1]
