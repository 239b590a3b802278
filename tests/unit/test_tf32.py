"""The subspace computation runs its matmuls in full float32 whatever TF32 setting the process
has, and leaves that setting as it found it, through whichever API the user set it with.

On a CPU no matmul uses TF32, so what is checked is the switch cuBLAS reads: every matmul of
the randomized range finder and of the lazy-refresh overlap sees
``torch.backends.cuda.matmul.fp32_precision == "ieee"`` (recorded at the op itself). Each user
style runs in a forked child: torch >= 2.9 remembers which API set the flag, so the styles
cannot share a process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

STYLES = ("default", "legacy", "new", "generic")

CHILD = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from gnlorp_dist.optim.projection import compute_projection, subspace_overlap

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in MATMULS:
                self.seen.append(torch.backends.cuda.matmul.fp32_precision)
            return func(*args, **(kwargs or {}))

    def legacy_read():
        try:
            return str(torch.backends.cuda.matmul.allow_tf32)
        except RuntimeError:
            return "raises"

    def run(style):
        m = torch.backends.cuda.matmul
        if style == "legacy":
            m.allow_tf32 = True
        elif style == "new":
            m.fp32_precision = "tf32"
        elif style == "generic":
            torch.backends.fp32_precision = "tf32"
        before = (m.fp32_precision, legacy_read())
        grad = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
        with Record() as record:
            basis = compute_projection(grad, 6, "right", method="randomized",
                                       generator=torch.Generator().manual_seed(1))
            subspace_overlap(basis, basis, "right")
        after = (m.fp32_precision, legacy_read())
        print(style, len(record.seen), sorted(set(record.seen)), before, after, flush=True)

    for style in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            run(style)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0, style
    """
)


@pytest.mark.skipif(
    not hasattr(torch.backends.cudnn, "fp32_precision"), reason="torch < 2.9: legacy flags only"
)
def test_subspace_matmuls_are_full_fp32_whatever_the_users_tf32_api():
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *STYLES], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(lines) == set(STYLES), done.stdout
    for line in lines.values():
        _style, count, rest = line.split(" ", 2)
        assert int(count) >= 6, line  # sketch, 2 power iterations (2 each), projection, overlap
        assert rest.startswith("['ieee']"), line  # every matmul saw full fp32
        seen, before_after = rest.split("] ", 1)
        before, after = before_after.split(") (")
        assert before + ")" == "(" + after, line  # restored, the legacy read included
    assert "'tf32'" in lines["legacy"] and "'tf32'" in lines["new"]  # TF32 was on before


def test_without_the_new_api_the_legacy_flag_is_switched_and_restored(monkeypatch):
    """torch < 2.9 (no ``fp32_precision``): the legacy flag is saved, cleared and restored."""
    from gnlorp_dist.optim.projection import full_fp32_matmuls

    class Legacy:
        allow_tf32 = True

        def __getattr__(self, name):
            raise AttributeError(name)

    legacy = Legacy()
    monkeypatch.setattr(torch.backends.cuda, "matmul", legacy)
    with full_fp32_matmuls():
        assert legacy.allow_tf32 is False
    assert legacy.allow_tf32 is True
    with pytest.raises(KeyError), full_fp32_matmuls():
        raise KeyError("restored on errors too")
    assert legacy.allow_tf32 is True
