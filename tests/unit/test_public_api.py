"""The public API users import: every name keeps resolving while internal modules move.

Pinned here (a removal or rename fails; an addition does not): ``gnlorp_dist.__all__``, the
transformers integration, the DeepSpeed integration's entry points, ``gnlorp_dist.distributed``'s
sharded save/load and communicators (also at their old path ``gnlorp_dist.optim.comm``), the
console scripts of pyproject.toml and the ``python -m gnlorp_dist.train`` entry module.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PACKAGE_NAMES = (
    "DEFAULT_TARGET_MODULES",
    "GradNormLoRPAdamW",
    "GradNormLoRPAdamW8bit",
    "PerLayerUpdates",
    "WeightNormLinear",
    "apply_weight_norm",
    "merge_weight_norm",
    "projected_param_groups",
    "__version__",
)
TRANSFORMERS_NAMES = (
    "GradNormLoRPCallback",
    "GradNormLoRPConfig",
    "GradNormLoRPTrainer",
    "GradNormLoRPTrainerMixin",
    "build_gnlorp_optimizer",
    "consolidate_for_save",
    "gnlorp_optimizer_cls_and_kwargs",
    "has_weight_norm",
    "merged_state_dict",
)
DEEPSPEED_NAMES = (
    "check_deepspeed_config",
    "fill_auto_values",
    "initialize",
    "initialize_from_checkpoint",
    "load_deepspeed_config",
    "save_checkpoint",
)
DISTRIBUTED_FUNCTIONS = (
    "save_sharded_optimizer",
    "load_sharded_optimizer",
    "save_dcp_checkpoint",
    "load_dcp_checkpoint",
    "full_model_state_dict",
    "fully_shard_model",
    "init_distributed",
    "init_single_process_group",
    "is_fsdp2_model",
    "wrap_for_data_parallel",
)
COMMUNICATORS = ("Communicator", "LocalCommunicator", "ProcessGroupCommunicator")
CONSOLE_SCRIPTS = ("gnlorp-bench", "gnlorp-finetune", "gnlorp-memory", "gnlorp-train")
# The collectives every communicator offers (gnlorp_dist.optim.comm.Communicator).
COMMUNICATOR_METHODS = (
    "broadcast",
    "all_reduce_sum",
    "reduce_sum",
    "all_gather_object",
    "all_ranks_arrive",
)


def _exported(module_name: str, names: tuple[str, ...]) -> None:
    """Each of ``names`` is importable from ``module_name`` and listed in its ``__all__``."""
    module = importlib.import_module(module_name)
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing, f"{module_name} lost {missing}"
    unlisted = [name for name in names if name not in module.__all__]
    assert not unlisted, f"{module_name}.__all__ lost {unlisted}"
    unresolved = [name for name in module.__all__ if not hasattr(module, name)]
    assert not unresolved, f"{module_name}.__all__ names {unresolved}, which do not resolve"


def test_package_all_resolves_to_the_optimizer_and_nn_objects():
    import gnlorp_dist
    import gnlorp_dist.nn
    import gnlorp_dist.optim

    _exported("gnlorp_dist", PACKAGE_NAMES)
    # One class whichever path imports it (isinstance checks, pickled configs).
    assert gnlorp_dist.GradNormLoRPAdamW is gnlorp_dist.optim.GradNormLoRPAdamW
    assert issubclass(gnlorp_dist.GradNormLoRPAdamW8bit, gnlorp_dist.GradNormLoRPAdamW)
    assert gnlorp_dist.apply_weight_norm is gnlorp_dist.nn.apply_weight_norm
    assert isinstance(gnlorp_dist.__version__, str)


def test_transformers_integration_names():
    _exported("gnlorp_dist.integrations.transformers", TRANSFORMERS_NAMES)
    from transformers import Trainer

    from gnlorp_dist.integrations.transformers import GradNormLoRPTrainer

    assert issubclass(GradNormLoRPTrainer, Trainer)


def test_sft_trainer_is_built_on_first_access():
    """Left out of ``__all__`` (``import *`` would import TRL), reached by name."""
    trl = pytest.importorskip("trl")
    from gnlorp_dist.integrations.transformers import GradNormLoRPSFTTrainer

    assert issubclass(GradNormLoRPSFTTrainer, trl.SFTTrainer)


def test_deepspeed_integration_names():
    _exported("gnlorp_dist.integrations.deepspeed", DEEPSPEED_NAMES)
    module = importlib.import_module("gnlorp_dist.integrations.deepspeed")
    assert all(callable(getattr(module, name)) for name in DEEPSPEED_NAMES)


def test_distributed_sharded_save_load_and_communicators():
    _exported("gnlorp_dist.distributed", DISTRIBUTED_FUNCTIONS + COMMUNICATORS)
    import gnlorp_dist.distributed as distributed
    import gnlorp_dist.optim.comm as comm

    assert all(callable(getattr(distributed, name)) for name in DISTRIBUTED_FUNCTIONS)
    # The old path stays importable and names the same objects.
    assert distributed.LocalCommunicator is comm.LocalCommunicator
    assert distributed.Communicator is comm.Communicator
    for cls in (distributed.LocalCommunicator, distributed.ProcessGroupCommunicator):
        missing = [m for m in COMMUNICATOR_METHODS if not callable(getattr(cls, m, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_local_communicator_is_a_one_process_group():
    import torch

    from gnlorp_dist.distributed import LocalCommunicator

    local = LocalCommunicator()
    assert (local.rank, local.world_size, local.device) == (0, 1, None)
    tensor = torch.arange(3.0)
    assert local.broadcast(tensor, src=0) is None
    assert local.all_reduce_sum(tensor) is None
    assert local.reduce_sum(tensor, dst=0) is None
    assert torch.equal(tensor, torch.arange(3.0))
    assert local.all_gather_object({"a": 1}) == [{"a": 1}]
    assert local.all_ranks_arrive("tag", timeout_s=0.0)


def test_optimizer_runs_with_the_public_local_communicator():
    """The one-process reference a launched job builds: the public communicator is accepted."""
    import torch

    from gnlorp_dist import GradNormLoRPAdamW
    from gnlorp_dist.distributed import LocalCommunicator

    weight = torch.nn.Parameter(torch.ones(4, 3))
    group = {"params": [weight], "rank": 2, "update_proj_gap": 1, "scale": 1.0, "proj_type": "std"}
    optimizer = GradNormLoRPAdamW([group], lr=0.1, communicator=LocalCommunicator())
    weight.grad = torch.arange(12.0).reshape(4, 3)
    optimizer.step()
    assert optimizer.comm.world_size == 1
    assert not torch.equal(weight.detach(), torch.ones(4, 3))


def _console_scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_console_scripts_resolve_to_callables():
    scripts = _console_scripts()
    assert set(CONSOLE_SCRIPTS) <= set(scripts), sorted(scripts)
    for name, target in scripts.items():
        module_name, _, attr = target.partition(":")
        assert attr, f"{name} = {target!r} names no function"
        entry = getattr(importlib.import_module(module_name), attr)
        assert callable(entry), f"{name} = {target!r} is not callable"


def test_python_m_gnlorp_dist_train_runs_gnlorp_train(monkeypatch, capsys):
    """The launchers' ``-m`` entry (torchrun, ``deepspeed --module``, ``accelerate launch -m``)."""
    from gnlorp_dist.training.run import main

    module = importlib.import_module("gnlorp_dist.train")
    assert module.main is main
    assert _console_scripts()["gnlorp-train"] == "gnlorp_dist.training.run:main"
    # Run as `python -m gnlorp_dist.train --help` does (a fresh execution of the module).
    monkeypatch.delitem(sys.modules, "gnlorp_dist.train")
    monkeypatch.setattr(sys, "argv", ["gnlorp_dist.train", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("gnlorp_dist.train", run_name="__main__", alter_sys=True)
    assert exited.value.code == 0
    assert "usage: gnlorp-train" in capsys.readouterr().out
