"""TRAIN: torch.compile health on the CPU. Dynamo traces the training forward of every architecture and option
in one graph (no graph break) and a compiled model does not recompile as the training fraction moves (ramps,
router warm-up, stochastic depth read a buffer, not a Python value). The inductor backend needs a GPU to be
worth timing; tracing is the same on the CPU, so these run with dynamo's eager backend."""
import pytest
import torch

import train_gpt
from conftest import perturbed_model

CONFIGS = {
    "attn": dict(ARCHITECTURE="attn"),
    "skc": dict(ARCHITECTURE="skc", SKC_AUX_ENTROPY_FRACTION=0.1),
    "koopman_ssm": dict(ARCHITECTURE="koopman_ssm"),
    "hybrid_shared_vrl": dict(ARCHITECTURE="hybrid", SHARED_BLOCKS=2, VRL_ENABLED=1),
    "competition_options": dict(ARCHITECTURE="competition", SKC_LAYERS="1", SKC_PARALLEL_RESIDUAL=1, PARALLEL_RESIDUAL_START=2,
                                XSA_START_LAYER=2, RECURRENCE_LAYERS="2", STOCHASTIC_DEPTH=0.2, TERNARY_NOISE_SCALE=0.1,
                                TURBO_QUANT_TRAIN=1, FP_STORAGE="fp8"),
    "addons": dict(BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64, ENGRAM_NUM_ORDERS=3, CAPSULE_ENABLED=1, CAPSULE_NUM=4,
                   KOOPMAN_SPECULATIVE_STEPS=2, KOOPMAN_HALT_THRESHOLD=0.01, FEEDBACK_ENABLED=1, FEEDBACK_PASSES=2,
                   MOE_ENABLED=1, MOE_NUM_EXPERTS=3, MOE_TOP_K=2),
}


def _batch():
    torch.manual_seed(0)
    return torch.randint(0, 1024, (2, 32)), torch.randint(0, 1024, (2, 32))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_forward_traces_as_one_graph_without_breaks(name):
    """torch._dynamo.explain of the training loss: exactly one graph, zero graph breaks."""
    torch._dynamo.reset()
    model = perturbed_model(**CONFIGS[name]).train()
    explanation = torch._dynamo.explain(model)(*_batch())
    reasons = [str(reason.reason)[:200] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


def test_compiled_model_does_not_recompile_as_training_progresses():
    """Every fraction-driven feature on; progress 0 -> 1 in six steps costs no recompile after the first step."""
    torch._dynamo.reset()
    config = dict(CONFIGS["addons"], **{k: v for k, v in CONFIGS["competition_options"].items() if k != "RECURRENCE_LAYERS"},
                  MOE_START_FRACTION=0.3, SKC_AMP_RAMP_FRACTION=0.5)
    model = perturbed_model(**config).train()
    compiled = torch.compile(model, dynamic=False, backend="eager")
    x, y = _batch()
    frames = []
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0):
        model.set_progress(fraction)
        compiled(x, y).backward()
        frames.append(train_gpt.compiled_frames())
    assert frames == [frames[0]] * len(frames) and frames[0] >= 1


def test_depth_recurrence_switch_is_the_one_recompile():
    """RECURRENCE_START_FRACTION flips a Python flag: exactly one more compiled frame when it switches on."""
    torch._dynamo.reset()
    model = perturbed_model(RECURRENCE_LAYERS="1", RECURRENCE_START_FRACTION=0.5).train()
    compiled = torch.compile(model, dynamic=False, backend="eager")
    x, y = _batch()
    frames = []
    for fraction in (0.0, 0.2, 0.6, 0.9):
        model.set_progress(fraction)
        compiled(x, y).backward()
        frames.append(train_gpt.compiled_frames())
    assert frames[1] == frames[0] and frames[2] == frames[0] + 1 and frames[3] == frames[2]
