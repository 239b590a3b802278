"""gnlorp-bench: files written, galore == galore-torch in a real run, state bytes, errors.

A tiny LLaMA on a few KB of Shakespeare, a few steps: the behaviour, not the numbers, is tested.
"""

from __future__ import annotations

import json
import math
import sys

import matplotlib.image
import pytest
import torch

from gnlorp_dist.bench import BenchConfig
from gnlorp_dist.bench.cli import config_from_args, main
from gnlorp_dist.bench.config import hyper, resolve
from gnlorp_dist.bench.methods import build_method, state_bytes
from gnlorp_dist.data.corpus import shakespeare_documents

pytestmark = pytest.mark.usefixtures("offline_shared_cache")

TINY_JSON = {
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
}  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model config and a small local text (tokenising the whole corpus is not needed)."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.json").write_text(json.dumps(TINY_JSON))
    (folder / "text.txt").write_text(shakespeare_documents()[0][:30_000])
    return folder


def tiny_args(tiny, out, *extra):
    return [
        "--model-config", str(tiny / "tiny.json"), "--data", str(tiny / "text.txt"),
        "--seq-len", "32", "--batch-size", "2", "--steps", str(STEPS), "--rank", "4",
        "--update-proj-gap", "2", "--eval-batches", "1", "--loss-window", "2",
        "--log-every", "2", "--threads", "1", "--output-dir", str(out), "--device", "cpu",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def comparison(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    capture = pytest.MonkeyPatch()
    methods = ["adamw", "galore,galore-torch", "gradnormlorp"]  # space and comma separated
    lines = []
    capture.setattr(sys, "stdout", _Tee(lines))
    try:
        assert main(tiny_args(tiny, out, "--methods", *methods)) == 0
    finally:
        capture.undo()
    assert torch.get_num_threads() == threads  # the run restores the thread count
    return out, "".join(lines)


class _Tee:
    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.append(text)

    def flush(self):
        pass


def test_table_json_log_and_pngs_are_written(comparison):
    out, stdout = comparison
    payload = json.loads((out / "compare.json").read_text())
    methods = ["adamw", "galore", "galore-torch", "gradnormlorp"]
    assert list(payload["methods"]) == methods
    table = (out / "compare.txt").read_text()
    for method in methods:
        assert any(line.startswith(method + " ") for line in table.splitlines())
        r = payload["methods"][method]
        assert len(r["losses"]) == len(r["step_seconds"]) == STEPS
        assert all(s > 0 for s in r["step_seconds"])
        assert math.isclose(r["final_train_loss"], sum(r["losses"][-2:]) / 2)
        assert r["eval_perplexity"] > 1
        memory = r["memory"]
        assert (
            memory["peak_bytes"] > 0 and sum(memory["breakdown"].values()) == memory["peak_bytes"]
        )
    assert payload["methods"]["adamw"]["time_ratio_to_adamw"] == 1.0
    assert payload["settings"]["device"] == "cpu" and "gpu" not in payload["settings"]
    assert "tokens_per_s" not in payload["methods"]["adamw"]  # GPU-only columns stay off
    assert table.splitlines()[0] in stdout  # the table is printed
    # one log line per method per interval (steps 2, 4 and the last step 5)
    log = (out / "compare.log").read_text().splitlines()
    assert sum(line.startswith("step ") for line in log) == 3 * len(methods)
    for name in ("loss_vs_step", "loss_vs_time", "memory"):
        path = out / f"{name}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        assert matplotlib.image.imread(path).ndim == 3  # decodes as an image


def test_galore_and_galore_torch_loss_curves_coincide(comparison):
    out, stdout = comparison
    payload = json.loads((out / "compare.json").read_text())
    ours = payload["methods"]["galore"]["losses"]
    theirs = payload["methods"]["galore-torch"]["losses"]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)
    # and the curves moved: a test comparing two constants would prove nothing
    assert ours[-1] < ours[0]
    reported = payload["checks"]["galore_vs_galore_torch_max_rel_loss_diff"]
    assert reported == max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    assert "galore vs galore-torch: max relative difference" in stdout


def test_gradnormlorp_keeps_fewer_optimizer_state_bytes_than_adamw(comparison):
    out, _ = comparison
    methods = json.loads((out / "compare.json").read_text())["methods"]
    ours, adamw = methods["gradnormlorp"], methods["adamw"]
    assert 0 < ours["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert 0 < ours["target_state_bytes"] < adamw["target_state_bytes"]
    assert ours["projection_bytes"] > 0 and adamw["projection_bytes"] == 0


def test_state_bytes_are_exact_for_torch_adamw(tiny):
    config, llama, _ = resolve(
        BenchConfig(model_config=str(tiny / "tiny.json"), rank=4, seq_len=32)
    )
    setup = build_method("adamw", llama, hyper(config), seed=0)
    ids = torch.randint(0, 32000, (1, 8))
    setup.model(input_ids=ids, labels=ids).loss.backward()
    setup.optimizer.step()
    params = [p for p in setup.model.parameters() if p.requires_grad]
    # exp_avg + exp_avg_sq in float32, and torch's 4-byte step tensor, per parameter
    expected = sum(2 * p.numel() * 4 + 4 for p in params)
    assert state_bytes(setup.optimizer) == {"total": expected, "projection": 0}


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--methods", "adamw,sgd"], "'sgd'"),
        (["--sweep", "depth"], "'depth'"),
        (["--sweep", "rank", "--sweep-values", "8,abc"], "'abc'"),
        (["--sweep", "gap", "--sweep-values", "0"], "0"),
        (["--sweep", "rank", "--sweep-values", "4096"], "4096"),
        (["--sweep", "rank", "--sweep-methods", "adamw"], "'adamw'"),
        (["--model", "llama_huge"], "'llama_huge'"),
    ],
)
def test_bad_input_is_a_clear_error_naming_the_value(tmp_path, capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_device_cuda_without_a_gpu_exits_2_naming_the_flag(tmp_path, capsys, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU host, even on a GPU one
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", device, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--device {device}, but torch sees no CUDA device" in err and "--device cpu" in err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_device_is_resolved_and_recorded():
    config, _, _ = resolve(BenchConfig(device="cpu"))
    assert config.device == "cpu"
    with pytest.raises(ValueError, match="--device 'tpu'"):
        resolve(BenchConfig(device="tpu"))


def test_bad_config_raises_value_error_naming_the_value():
    with pytest.raises(ValueError, match="'sgd'"):
        resolve(BenchConfig(methods=("sgd",)))
    with pytest.raises(ValueError, match="-3"):
        resolve(BenchConfig(sweep="gap", sweep_values=(10, -3)))
    assert config_from_args(["--sweep-values", "8", "16,32"]).sweep_values == (8, 16, 32)


def test_tensorboard_events_are_written_when_asked(tiny, tmp_path):
    argv = tiny_args(tiny, tmp_path, "--methods", "adamw", "--steps", "2", "--no-measure-memory")
    assert main([*argv, "--tensorboard"]) == 0
    events = list((tmp_path / "tensorboard" / "compare" / "adamw").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert not (tmp_path / "memory.png").exists()


def test_missing_tensorboard_is_a_clean_error(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny_args(tiny, tmp_path, "--methods", "adamw"), "--tensorboard"])
    assert exit_info.value.code == 2
    assert "pip install tensorboard" in capsys.readouterr().err


def test_rank_sweep_writes_its_own_table_json_and_plot(tiny, tmp_path):
    argv = tiny_args(tiny, tmp_path, "--steps", "2", "--sweep", "rank", "--sweep-values", "2,4")
    assert main(argv) == 0
    payload = json.loads((tmp_path / "sweep_rank.json").read_text())
    assert set(payload["points"]) == {"gradnormlorp", "galore"}
    for points in payload["points"].values():
        assert [value for value, _ in points] == [2, 4]
        assert all(math.isfinite(loss) for _, loss in points)
    assert (tmp_path / "sweep_rank.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "gradnormlorp" in (tmp_path / "sweep_rank.txt").read_text()


GRANULAR = ("vlorp", "vlorp-projfactor", "gradnormlorp-granular")


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """The tiny shape with a 512-token vocabulary: building and stepping it takes milliseconds."""
    path = tmp_path_factory.mktemp("small") / "small.json"
    path.write_text(json.dumps({**TINY_JSON, "vocab_size": 512}))
    return path


def _one_step(config_path, method, **fields):
    """``method`` built from a resolved config, after one optimizer step on random tokens."""
    config, llama, _ = resolve(
        BenchConfig(
            model_config=str(config_path), methods=(method,), seq_len=16, device="cpu", **fields
        )
    )
    setup = build_method(method, llama, hyper(config), seed=0)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    setup.model(input_ids=ids, labels=ids).loss.backward()
    setup.optimizer.step()
    return setup


@pytest.mark.parametrize("method", GRANULAR)
def test_granular_methods_step_with_state_of_c_times_r_per_row(small_vocab, method):
    """State per projected M x N matrix: exp_avg (M c, r) and exp_avg_sq of the same shape (or
    ProjFactor's M + N sums), plus an r x N / c basis for the SVD method, none for random ones;
    the default rank is --rank / --granularity (equal budget c * r = --rank)."""
    for c, r in [(1, 4), (2, 2), (4, 1), (2, 4)]:
        setup = _one_step(small_vocab, method, rank=c * r, granularity=c)
        group = setup.optimizer.param_groups[0]
        assert (group["granularity"], group["rank"]) == (c, r)
        expected = 0
        for param in group["params"]:
            rows, cols = param.shape
            state = setup.optimizer.state[param]
            assert state["exp_avg"].shape == (rows * c, r)
            expected += rows * c * r * 4
            if method == "vlorp-projfactor":
                assert "exp_avg_sq" not in state
                assert state["row_sq"].shape == (rows,) and state["col_sq"].shape == (cols,)
                expected += (rows + cols) * 4
            else:
                assert state["exp_avg_sq"].shape == (rows * c, r)
                expected += rows * c * r * 4
            if method == "gradnormlorp-granular":
                assert state["proj"].shape == (r, cols // c)
                expected += r * (cols // c) * 4
            else:
                assert "proj" not in state  # random bases are regenerated, never stored
        projected = {id(p) for p in group["params"]}
        assert state_bytes(setup.optimizer, projected)["total"] == expected
        assert all(torch.isfinite(p).all() for p in setup.model.parameters())


def test_granular_methods_keep_the_default_methods_and_check_c(tiny, capsys, tmp_path):
    assert not set(GRANULAR) & set(BenchConfig().methods)
    config, _, _ = resolve(BenchConfig(sweep="granularity"))
    assert config.sweep_methods == GRANULAR and config.sweep_values == (1, 2, 4, 8)
    assert hyper(config, granularity=8).vlorp_rank == 4  # c * r stays the recipe's rank 32
    for argv, named in [
        (["--methods", "vlorp", "--granularity", "3"], "--granularity 3"),
        (["--methods", "vlorp", "--rank", "30"], "rank 30"),
        (["--sweep", "granularity", "--sweep-values", "1,64"], "64"),
        (["--sweep", "granularity", "--sweep-methods", "galore"], "'galore'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--output-dir", str(tmp_path)])
        assert exit_info.value.code == 2
        assert named in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_granularity_sweep_writes_its_table_with_c_and_r(tiny, tmp_path):
    argv = tiny_args(
        tiny, tmp_path, "--steps", "2", "--sweep", "granularity", "--sweep-values", "1,4",
        "--sweep-methods", "vlorp", "gradnormlorp-granular",
    )  # fmt: skip
    assert main(argv) == 0
    payload = json.loads((tmp_path / "sweep_granularity.json").read_text())
    assert set(payload["points"]) == {"vlorp", "gradnormlorp-granular"}
    for points in payload["points"].values():
        assert [value for value, _ in points] == [1, 4]
        assert all(math.isfinite(loss) for _, loss in points)
    table = (tmp_path / "sweep_granularity.txt").read_text()
    assert "c x r" in table and "1 x 4" in table and "4 x 1" in table
    assert (tmp_path / "sweep_granularity.png").read_bytes().startswith(PNG_SIGNATURE)
