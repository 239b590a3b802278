"""``copy.deepcopy`` and pickle of an optimizer that keeps attributes of its own.

``torch.optim.Optimizer.__getstate__`` keeps ``defaults``, ``state`` and ``param_groups`` only:
a subclass's own attributes (the parsed groups, the communicator, the policies) are lost and
the copy cannot step. :class:`CopyableOptimizer` keeps every attribute but the transient ones,
which a copy starts without:

- torch's hook dictionaries (torch does not carry hooks into a copy either);
- the attributes named in ``_transient_attributes`` (caches, and attachments to hooks that
  belong to the original's parameters), set to None;
- the communicator: a deepcopy shares it (the same ranks; a process group cannot be copied); a
  pickle keeps a one-process communicator and leaves any other to be resolved again, as the
  job's default, at the copy's first step.

On unpickling and on ``load_state_dict`` (torch's calls ``__setstate__``) every group gets the
constructor's options it lacks (:func:`~gnlorp_dist.optim.spec.fill_group_defaults`), as torch's
own optimizers fill the flags newer than a saved state dict.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from gnlorp_dist.optim.comm import LocalCommunicator
from gnlorp_dist.optim.spec import fill_group_defaults

TORCH_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
COMMUNICATOR_ATTRIBUTE = "_comm"


class CopyableOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose copies and pickles keep its own attributes."""

    _transient_attributes: tuple[str, ...] = ()
    """Attributes a copy starts with as None (caches, per-process attachments)."""

    def _copied_state(self, *, keep_communicator: bool) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in TORCH_HOOK_DICTS}
        for name in self._transient_attributes:
            state[name] = None
        comm = state.get(COMMUNICATOR_ATTRIBUTE)
        if not keep_communicator and not isinstance(comm, LocalCommunicator):
            state[COMMUNICATOR_ATTRIBUTE] = None
        return state

    def __getstate__(self) -> dict[str, Any]:
        return self._copied_state(keep_communicator=False)

    def __setstate__(self, state: dict[str, Any]) -> None:
        replaced = self.__dict__.get("param_groups")
        super().__setstate__(state)
        fill_group_defaults(self.param_groups, replaced, self.defaults)

    def __deepcopy__(self, memo: dict[int, Any]) -> CopyableOptimizer:
        comm = self.__dict__.get(COMMUNICATOR_ATTRIBUTE)
        if comm is not None:
            memo[id(comm)] = comm
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self._copied_state(keep_communicator=True), memo))
        return copied
