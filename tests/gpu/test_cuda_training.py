"""gnlorp_dist.training.run on a CUDA device: a bf16-autocast run, and checkpoints that move between
the GPU and the CPU. Skipped without a GPU (``tests/conftest.py``)."""

from __future__ import annotations

import json
import math

import pytest

from gnlorp_dist.data.corpus import shakespeare_documents
from gnlorp_dist.training.config import RunConfig
from gnlorp_dist.training.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("offline_shared_cache")]

TINY_JSON = {
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
}  # fmt: skip
STEPS, GAP, INTERRUPT_AT = 8, 4, 5
"""Refreshes at steps 1 and 5 (step counters 0 and 4), both before the interruption: the steps
compared after the resume (6 to 8) refresh nothing. A refresh on the other device would take
its singular vectors from another library (LAPACK, cuSOLVER), whose signs differ, and the
moments carried into the new basis would then point the other way: a real difference of the
two runs, not an error. Bases across devices are compared by subspace distance instead
(tests/gpu/test_cuda_numerics.py)."""
RESUME_TOLERANCE = 1e-3
"""Relative loss difference allowed between a run resumed on the other device and the
uninterrupted run: fp32 with TF32 off, so only the devices' summation orders differ."""


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.json").write_text(json.dumps(TINY_JSON))
    (folder / "text.txt").write_text(shakespeare_documents()[0][:30_000])
    return folder


def config(tiny, out, device, **overrides):
    fields = dict(
        model_config=str(tiny / "tiny.json"), data=str(tiny / "text.txt"), seq_len=32,
        batch_size=2, max_steps=STEPS, rank=8, update_proj_gap=GAP, eval_batches=1,
        output_dir=str(out), progress=False, log_every=STEPS, save_every=INTERRUPT_AT,
        device=device, tf32=False,
    )  # fmt: skip
    config = RunConfig(**{**fields, **overrides})
    assert (INTERRUPT_AT - 1) // GAP == (STEPS - 1) // GAP, "a refresh after the resume"
    return config


def test_bf16_autocast_steps_are_finite_and_the_loss_falls(tiny, tmp_path):
    result = train(config(tiny, tmp_path, "cuda", autocast="bf16", max_steps=12, lr=2e-2))
    assert len(result.losses) == 12 and all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.3, result.losses
    assert result.memory["max_memory_allocated"] > 0  # measured on the GPU
    assert math.isfinite(result.eval_loss)


def _interrupted_then_resumed(tiny, out, first, second):
    def stop(step, saved):
        if step == INTERRUPT_AT:
            assert saved is not None  # the checkpoint the second device resumes from
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config(tiny, out, first), on_step_end=stop)
    return train(config(tiny, out, second))


@pytest.mark.parametrize(("first", "second"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_device(tiny, tmp_path, first, second):
    straight = train(config(tiny, tmp_path / "straight", first)).losses
    resumed = _interrupted_then_resumed(tiny, tmp_path / "moved", first, second)
    assert resumed.final_step == STEPS and len(resumed.losses) == STEPS - INTERRUPT_AT
    for step, (a, b) in enumerate(zip(resumed.losses, straight[INTERRUPT_AT:]), INTERRUPT_AT + 1):
        assert abs(a - b) <= RESUME_TOLERANCE * abs(b), (step, a, b)
    assert straight[-1] < straight[0]  # the compared losses moved
    assert bool(resumed.memory) == (second == "cuda")
