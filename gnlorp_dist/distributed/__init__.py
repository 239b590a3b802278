"""The distributed layer: collectives over torch.distributed and sharded optimizer checkpoints.

The only package of gnlorp_dist that imports ``torch.distributed``. The public home of the
communicators: :class:`Communicator` (what the optimizer needs from a process group),
:class:`ProcessGroupCommunicator` (over ``torch.distributed``) and :class:`LocalCommunicator`
(one process: e.g. a one-process reference optimizer inside a launched job). ``Communicator``
and ``LocalCommunicator`` are defined in :mod:`gnlorp_dist.optim.comm` (the optimizer's layer,
below this one), which stays importable.
"""

from gnlorp_dist.distributed.communicator import (
    ProcessGroupCommunicator,
    broadcast_parameters,
    collective_device,
    communicator_for_current_process,
)
from gnlorp_dist.distributed.fsdp2 import (
    full_model_state_dict,
    fully_shard_model,
    init_single_process_group,
    is_fsdp2_model,
    load_dcp_checkpoint,
    save_dcp_checkpoint,
)
from gnlorp_dist.distributed.launch import (
    SINGLE_PROCESS,
    DistributedContext,
    init_distributed,
    process_group_options,
    wrap_for_data_parallel,
)
from gnlorp_dist.distributed.sharded_state import load_sharded_optimizer, save_sharded_optimizer
from gnlorp_dist.optim.comm import Communicator, LocalCommunicator

__all__ = [
    "SINGLE_PROCESS",
    "DistributedContext",
    "init_distributed",
    "process_group_options",
    "collective_device",
    "wrap_for_data_parallel",
    "Communicator",
    "LocalCommunicator",
    "ProcessGroupCommunicator",
    "broadcast_parameters",
    "communicator_for_current_process",
    "load_sharded_optimizer",
    "save_sharded_optimizer",
    "full_model_state_dict",
    "fully_shard_model",
    "init_single_process_group",
    "is_fsdp2_model",
    "load_dcp_checkpoint",
    "save_dcp_checkpoint",
]
