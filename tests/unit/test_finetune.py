"""gnlorp-finetune: metrics against independent computations, data and label handling, and end
to end runs (full mode, LoRA mode, regression) whose merged model stock transformers reloads."""

import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from gnlorp_dist.finetune import FinetuneConfig, finetune, prepare, run_finetune
from gnlorp_dist.finetune.cli import main
from gnlorp_dist.finetune.config import resolve
from gnlorp_dist.finetune.data import (
    GLUE_TASKS,
    collate,
    infer_regression,
    label_space,
    read_table,
)
from gnlorp_dist.finetune.metrics import (
    accuracy,
    average_ranks,
    default_metric_names,
    f1_binary,
    matthews_corrcoef,
    parse_metric_names,
    pearson,
    spearman,
)
from gnlorp_dist.finetune.models import model_source
from gnlorp_dist.nn import WeightNormLinear

pytestmark = pytest.mark.usefixtures("offline_shared_cache")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "finetune"
SENTIMENT = {
    "train_file": str(EXAMPLES / "sentiment_train.csv"),
    "validation_file": str(EXAMPLES / "sentiment_validation.csv"),
}
SIMILARITY = {
    "train_file": str(EXAMPLES / "similarity_train.jsonl"),
    "validation_file": str(EXAMPLES / "similarity_validation.jsonl"),
    "label_column": "score",
}


# ------------------------------------------------------------------------------- metrics


def test_metrics_reproduce_published_reference_values():
    # sklearn's matthews_corrcoef docstring example
    assert matthews_corrcoef([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(-1 / 3)
    # scipy.stats.pearsonr and spearmanr docstring examples
    assert pearson([10, 9, 2.5, 6, 4], [1, 2, 3, 4, 5]) == pytest.approx(-0.7426106572325056)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    # hand counts: 4 of 6 right; TP=2, FP=1, FN=1 -> F1 = 4 / 6
    pred, true = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    assert accuracy(pred, true) == pytest.approx(4 / 6)
    assert f1_binary(pred, true) == pytest.approx(2 / 3)
    assert average_ranks([10, 20, 20, 30, 20]).tolist() == [1.0, 3.0, 3.0, 5.0, 3.0]


def _naive_ranks(values):
    """O(n^2) tie-averaged ranks: 1 + (#smaller) + (#equal - 1) / 2."""
    v = np.asarray(values, dtype=float)
    return np.array([1 + np.sum(v < x) + (np.sum(v == x) - 1) / 2 for x in v])


def _one_hot_mcc(pred, true, k):
    """Multi-class MCC as the correlation of the one-hot indicator matrices (Gorodkin 2004)."""
    x, y = np.eye(k)[pred], np.eye(k)[true]
    x, y = x - x.mean(0), y - y.mean(0)
    return np.sum(x * y) / math.sqrt(np.sum(x * x) * np.sum(y * y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_independent_implementations(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, true, 1 - true)
    tp = np.sum((pred == 1) & (true == 1))
    tn = np.sum((pred == 0) & (true == 0))
    fp = np.sum((pred == 1) & (true == 0))
    fn = np.sum((pred == 0) & (true == 1))
    assert accuracy(pred, true) == pytest.approx((tp + tn) / 200)
    assert f1_binary(pred, true) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    phi = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(pred, true) == pytest.approx(phi)
    true3, pred3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    pred3[:150] = true3[:150]
    assert matthews_corrcoef(pred3, true3) == pytest.approx(_one_hot_mcc(pred3, true3, 3))
    # Scores rounded to one decimal: many ties, which Spearman must average.
    x = np.round(rng.normal(size=100), 1)
    y = np.round(x + rng.normal(scale=0.7, size=100), 1)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert spearman(x, y) == pytest.approx(np.corrcoef(_naive_ranks(x), _naive_ranks(y))[0, 1])


def test_metrics_undefined_cases_and_errors():
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction
    assert f1_binary([0, 0], [0, 0]) == 0.0
    assert pearson([1, 2, 3], [2, 4, 6]) == 1.0
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy([1, 0, 1], [1, 0])


class OldMetrics:
    """The hand-written metrics that gnlorp-finetune shipped before it used sklearn/scipy (numpy
    only), kept verbatim as the reference the library's values must still agree with."""

    @staticmethod
    def _pair(predictions, labels, dtype):
        pred = np.asarray(predictions, dtype=dtype).reshape(-1)
        true = np.asarray(labels, dtype=dtype).reshape(-1)
        return pred, true

    @classmethod
    def accuracy(cls, predictions, labels):
        pred, true = cls._pair(predictions, labels, np.int64)
        return float(np.mean(pred == true))

    @classmethod
    def f1_binary(cls, predictions, labels, positive=1):
        pred, true = cls._pair(predictions, labels, np.int64)
        tp = int(np.sum((pred == positive) & (true == positive)))
        fp = int(np.sum((pred == positive) & (true != positive)))
        fn = int(np.sum((pred != positive) & (true == positive)))
        denominator = 2 * tp + fp + fn
        return 2.0 * tp / denominator if denominator else 0.0

    @classmethod
    def matthews_corrcoef(cls, predictions, labels):
        pred, true = cls._pair(predictions, labels, np.int64)
        classes, encoded = np.unique(np.concatenate([true, pred]), return_inverse=True)
        k = classes.size
        confusion = np.zeros((k, k), dtype=np.float64)
        np.add.at(confusion, (encoded[: true.size], encoded[true.size :]), 1.0)
        t_k, p_k = confusion.sum(axis=1), confusion.sum(axis=0)
        c, s = np.trace(confusion), confusion.sum()
        cov_pred_true = c * s - p_k @ t_k
        cov_pred = s * s - p_k @ p_k
        cov_true = s * s - t_k @ t_k
        if cov_pred == 0.0 or cov_true == 0.0:
            return 0.0
        return float(cov_pred_true / math.sqrt(cov_pred * cov_true))

    @classmethod
    def pearson(cls, predictions, labels):
        x, y = cls._pair(predictions, labels, np.float64)
        x, y = x - x.mean(), y - y.mean()
        denominator = math.sqrt(float(x @ x) * float(y @ y))
        if denominator == 0.0:
            return math.nan
        return float(np.clip((x @ y) / denominator, -1.0, 1.0))

    @staticmethod
    def average_ranks(values):
        data = np.asarray(values, dtype=np.float64).reshape(-1)
        order = np.argsort(data, kind="stable")
        sorted_values = data[order]
        starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
        ends = np.r_[starts[1:], data.size]
        run_ranks = (starts + 1 + ends) / 2.0
        ranks = np.empty(data.size, dtype=np.float64)
        ranks[order] = np.repeat(run_ranks, ends - starts)
        return ranks

    @classmethod
    def spearman(cls, predictions, labels):
        x, y = cls._pair(predictions, labels, np.float64)
        return cls.pearson(cls.average_ranks(x), cls.average_ranks(y))


NEW_METRICS = {
    "accuracy": accuracy,
    "f1_binary": f1_binary,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def _assert_agree_with_old(name, pred, true):
    new, old = NEW_METRICS[name](pred, true), getattr(OldMetrics, name)(pred, true)
    assert type(new) is float
    if math.isnan(old):
        assert math.isnan(new), (name, pred, true, new)
    else:
        assert new == pytest.approx(old, rel=1e-12, abs=1e-12), (name, pred, true, new, old)


def _classification_cases(rng):
    """(pred, true) pairs: binary and 3/5-class, balanced and skewed, constant, no positives,
    one example, labels that skip ids."""
    cases = []
    for n in (1, 2, 3, 7, 50, 500):
        for k in (2, 3, 5):
            true = rng.integers(0, k, n)
            pred = np.where(rng.random(n) < rng.random(), true, rng.integers(0, k, n))
            cases.append((pred, true))
        cases.append((np.zeros(n, int), rng.integers(0, 2, n)))  # constant prediction
        cases.append((rng.integers(0, 2, n), np.ones(n, int)))  # constant truth
        cases.append((np.zeros(n, int), np.zeros(n, int)))  # no positives anywhere
        cases.append((rng.choice([0, 2, 7], n), rng.choice([0, 2, 7], n)))  # ids 1 absent
    return cases


def _regression_cases(rng):
    """(pred, true) pairs: continuous, heavily tied, constant, perfectly (anti-)correlated,
    one and two examples."""
    cases = [([1.0], [2.0]), ([1.0, 2.0], [3.0, 1.0]), ([1, 1, 1], [1, 2, 3])]
    for n in (3, 10, 100, 1000):
        x = rng.normal(size=n)
        cases += [
            (x, x + rng.normal(scale=rng.random() * 2, size=n)),
            (np.round(x, 1), np.round(x + rng.normal(size=n), 0)),  # many ties
            (x, 2 * x + 1),
            (x, -3 * x),
            (np.full(n, 0.5), x),
            (rng.integers(0, 3, n).astype(float), rng.integers(0, 3, n).astype(float)),
        ]
    return cases


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_the_previous_hand_written_ones_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    for pred, true in _classification_cases(rng):
        for name in ("accuracy", "f1_binary", "matthews_corrcoef"):
            _assert_agree_with_old(name, pred, true)
    for pred, true in _regression_cases(rng):
        for name in ("pearson", "spearman"):
            _assert_agree_with_old(name, pred, true)
        np.testing.assert_array_equal(average_ranks(pred), OldMetrics.average_ranks(pred))


def test_metrics_agree_with_the_previous_ones_on_the_fixtures():
    # The hand-checked inputs of the tests above.
    fixed = [
        ([1, 0, 1, 1], [1, 1, 1, 0]),
        ([1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]),
        ([1, 1, 1], [0, 1, 0]),
        ([0, 0], [0, 0]),
    ]
    for pred, true in fixed:
        for name in ("accuracy", "f1_binary", "matthews_corrcoef"):
            _assert_agree_with_old(name, pred, true)
    for pred, true in [
        ([10, 9, 2.5, 6, 4], [1, 2, 3, 4, 5]),
        ([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]),
        ([1, 1, 1], [1, 2, 3]),
        ([1, 2, 3], [4, 4, 4]),
        ([1, 2, 3], [2, 4, 6]),
    ]:
        for name in ("pearson", "spearman"):
            _assert_agree_with_old(name, pred, true)
    # The example datasets' validation labels against a noisy and a constant predictor.
    rng = np.random.default_rng(0)
    labels = np.asarray(read_table(SENTIMENT["validation_file"])["label"], dtype=int)
    for pred in (np.where(rng.random(labels.size) < 0.8, labels, 1 - labels), labels * 0):
        for name in ("accuracy", "f1_binary", "matthews_corrcoef"):
            _assert_agree_with_old(name, pred, labels)
    scores = np.asarray(read_table(SIMILARITY["validation_file"])["score"], dtype=float)
    for pred in (scores + rng.normal(size=scores.size), np.round(scores)):
        for name in ("pearson", "spearman"):
            _assert_agree_with_old(name, pred, scores)


def test_undefined_metrics_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
        assert matthews_corrcoef([0, 0, 0], [0, 0, 0]) == 0.0
        assert f1_binary([0, 0], [0, 0]) == 0.0
        assert f1_binary([0, 2, 0], [2, 2, 0]) == 0.0
        assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
        assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
        assert math.isnan(pearson([1.0], [2.0])) and math.isnan(spearman([1.0], [2.0]))


def test_metric_choice_follows_glue_and_the_labels():
    official = {name: task.metrics for name, task in GLUE_TASKS.items()}
    assert official["cola"] == ("matthews",) and official["sst2"] == ("accuracy",)
    assert official["mrpc"] == official["qqp"] == ("accuracy", "f1")
    assert official["stsb"] == ("pearson", "spearman") and GLUE_TASKS["stsb"].num_labels == 1
    for name in ("mnli", "qnli", "rte", "wnli"):
        assert official[name] == ("accuracy",)
    assert GLUE_TASKS["mnli"].validation_split == "validation_matched"
    assert default_metric_names(regression=True, num_labels=1) == ("pearson", "spearman")
    assert default_metric_names(regression=False, num_labels=2) == ("accuracy", "f1", "matthews")
    assert "f1" not in default_metric_names(regression=False, num_labels=3)
    assert parse_metric_names("Accuracy, f1", regression=False) == ("accuracy", "f1")
    with pytest.raises(ValueError, match="'pearson' does not apply to a classification"):
        parse_metric_names("pearson", regression=False)
    with pytest.raises(ValueError, match="'bleu' is unknown"):
        parse_metric_names("bleu", regression=True)


# ---------------------------------------------------------------------------- data, labels


def test_read_table_formats(tmp_path):
    rows = [{"text": "a, b", "label": "1"}, {"text": 'say "hi"', "label": "0"}]
    (tmp_path / "d.csv").write_text('text,label\n"a, b",1\n"say ""hi""",0\n')
    (tmp_path / "d.tsv").write_text('text\tlabel\na, b\t1\nsay "hi"\t0\n')
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "cols.json").write_text(
        json.dumps({"text": ["a, b", 'say "hi"'], "label": ["1", "0"]})
    )
    for name in ("d.csv", "d.tsv", "d.jsonl", "list.json", "wrapped.json", "cols.json"):
        assert read_table(tmp_path / name) == {"text": ["a, b", 'say "hi"'], "label": ["1", "0"]}
    (tmp_path / "d.parquet").write_text("")
    with pytest.raises(ValueError, match=r"unknown format '\.parquet'"):
        read_table(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="does not exist"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "ragged.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"example 1 lacks column\(s\) \['label'\]"):
        read_table(tmp_path / "ragged.jsonl")


def test_labels_classification_or_regression():
    assert infer_regression(["3.2", "4.0", "1"]) and infer_regression([0.5, 2])
    assert not infer_regression(["1", "0", 2]) and not infer_regression(["pos", "neg"])
    space = label_space(["neg", "pos", "neg"], "auto", None)
    assert space.names == ["neg", "pos"] and not space.regression
    assert space.encode(["pos", "neg"], "validation", "label").tolist() == [1, 0]
    with pytest.raises(ValueError, match="label 'meh' is not one of the training labels"):
        space.encode(["meh"], "validation", "label")
    assert label_space(["0", "2"], "auto", None).names == ["0", "1", "2"]
    assert label_space(["1", "0"], "regression", None).regression
    with pytest.raises(ValueError, match="class ids >= 0; found -1"):
        label_space([-1, 0, 1], "auto", None)
    with pytest.raises(ValueError, match="single class"):
        label_space(["a", "a"], "auto", None)


def test_model_sources(tmp_path):
    assert model_source("tiny-bart", None) == "builtin"
    assert model_source("roberta-base", None) == "hub"  # classified only, nothing downloaded
    assert model_source("whatever", str(tmp_path / "c.json")) == "config"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        model_source(str(tmp_path / "empty"), None)
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights"):
        model_source(str(tmp_path / "empty"), None)
    with pytest.raises(ValueError, match="neither a built-in model"):
        model_source("./not/here", None)


# ------------------------------------------------------------------------------- end to end


@torch.no_grad()
def _reloaded_logits(final_dir, texts, max_len=128):
    model = AutoModelForSequenceClassification.from_pretrained(final_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(final_dir, local_files_only=True)
    columns = list(zip(*texts))
    batch = tokenizer(
        *columns, truncation=True, max_length=max_len, padding=True, return_tensors="pt"
    )
    return model.eval()(**batch).logits, batch


@torch.no_grad()
def _our_logits(run, count):
    run.model.eval()
    batch = collate(run.validation, list(range(count)), run.tokenizer.pad_token_id)
    batch.pop("labels")
    return run.model(**batch).logits, batch


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The documented example: GradNormLoRP full mode, tiny-roberta, default settings."""
    out = tmp_path_factory.mktemp("full")
    run = prepare(FinetuneConfig(**SENTIMENT, output_dir=str(out), log_every=10))
    result = run_finetune(run)
    return run, result


def test_full_mode_learns_and_saves_a_stock_checkpoint(full_run, capsys):
    run, result = full_run
    assert any(isinstance(m, WeightNormLinear) for m in run.model.modules())
    # The head keeps its names (dense, out_proj) but stays a plain linear layer.
    assert type(run.model.classifier.dense) is nn.Linear
    assert set(result.metrics) == {"eval_loss", "accuracy", "f1", "matthews"}
    assert result.metrics["accuracy"] > 0.75, result.history  # majority class is 0.56
    assert len(result.history) == run.config.epochs  # one evaluation per epoch
    assert result.train_losses[-1] < result.train_losses[0] - 0.3
    final = result.final_dir
    weights = load_file(final / "model.safetensors")
    assert not any("direction" in k or "magnitude" in k for k in weights)
    assert "roberta.encoder.layer.0.attention.self.query.weight" in weights
    ours, our_batch = _our_logits(run, 40)
    theirs, their_batch = _reloaded_logits(str(final), run.validation.texts[:40])
    assert torch.equal(our_batch["input_ids"], their_batch["input_ids"])
    assert (ours - theirs).abs().max() < 1e-4
    assert result.merged_max_abs_logit_diff < 1e-4 and result.reloaded_tokenizer_matches
    record = json.loads((Path(run.config.output_dir) / "metrics.json").read_text())
    assert record["metrics"]["accuracy"] == result.metrics["accuracy"]
    assert record["metric_names"] == ["accuracy", "f1", "matthews"]
    assert record["config"]["optimizer"] == "gradnormlorp"


def test_lora_mode_on_a_saved_model_trains_adapters_only_and_folds_them(full_run, tmp_path):
    _, base = full_run
    run = prepare(
        FinetuneConfig(
            **SENTIMENT, model=str(base.final_dir), lora_rank=4, lr=2e-3, max_steps=12,
            output_dir=str(tmp_path / "lora"), eval_every=6,
        )
    )  # fmt: skip
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith("classifier.") or n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude")
        for n in trainable
    )
    assert run.optimizer.param_groups[0]["rank"] == 4  # rank follows --lora-rank
    projected = set(run.optimizer.param_groups[0]["param_names"])
    assert projected and all(n.endswith(("lora_A", "lora_B")) for n in projected)
    embeddings_before = run.model.roberta.embeddings.word_embeddings.weight.clone()
    result = run_finetune(run)
    assert set(result.metrics) == {"eval_loss", "accuracy", "f1", "matthews"}
    assert [h["step"] for h in result.history] == [6, 12]
    assert torch.equal(run.model.roberta.embeddings.word_embeddings.weight, embeddings_before)
    key = "roberta.encoder.layer.0.attention.self.query.weight"
    folded = load_file(result.final_dir / "model.safetensors")[key]
    original = load_file(base.final_dir / "model.safetensors")[key]
    assert not torch.allclose(folded, original)  # the trained adapters are in the weight
    ours, _ = _our_logits(run, 32)
    theirs, _ = _reloaded_logits(str(result.final_dir), run.validation.texts[:32])
    assert (ours - theirs).abs().max() < 1e-4


def test_regression_reports_correlations_and_reloads(tmp_path):
    run = prepare(FinetuneConfig(**SIMILARITY, epochs=5, output_dir=str(tmp_path / "sts")))
    assert run.raw.labels.regression and run.model.config.num_labels == 1
    result = run_finetune(run)
    assert set(result.metrics) == {"eval_loss", "pearson", "spearman"}
    assert result.metrics["pearson"] > 0.5, result.history
    ours, _ = _our_logits(run, 32)
    theirs, _ = _reloaded_logits(str(result.final_dir), run.validation.texts[:32])
    assert ours.shape == (32, 1) and (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("model", "optimizer", "extra"),
    [("tiny-bert", "galore", {}), ("tiny-bart", "gradnormlorp", {}), ("tiny-bart", "adamw", {})],
)
def test_architectures_and_optimizers_smoke(tmp_path, model, optimizer, extra):
    config = FinetuneConfig(
        **SENTIMENT, model=model, optimizer=optimizer, max_steps=3, max_train_samples=48,
        max_eval_samples=32, output_dir=str(tmp_path / "o"), **extra,
    )  # fmt: skip
    run = prepare(config)
    head = getattr(run.model, "classification_head", None) or run.model.classifier
    assert not any(isinstance(m, WeightNormLinear) for m in head.modules())
    if optimizer != "adamw":
        projected = run.optimizer.param_groups[0]["param_names"]
        assert projected and not any(
            "classifier" in n or "classification_head" in n for n in projected
        )
    result = run_finetune(run)
    assert result.steps == 3 and result.merged_max_abs_logit_diff < 1e-4


def test_model_config_builds_that_architecture_from_scratch(tmp_path):
    config_file = tmp_path / "config.json"
    shape = {"model_type": "bert", "vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 1}
    config_file.write_text(json.dumps({**shape, "num_attention_heads": 2, "intermediate_size": 64}))
    run = prepare(
        FinetuneConfig(
            **SENTIMENT, model_config=str(config_file), max_steps=2, output_dir=str(tmp_path / "o")
        )
    )
    assert run.model.config.model_type == "bert" and run.model.config.hidden_size == 32
    assert len(run.tokenizer) <= 40  # the word-level vocabulary is capped at the config's
    assert run.config.lr == 2e-3  # random init: the from-scratch recipe
    assert run_finetune(run).merged_max_abs_logit_diff < 1e-4


def test_text_log_and_tensorboard(tmp_path, capsys):
    result = finetune(
        FinetuneConfig(
            **SENTIMENT, max_steps=4, log_every=2, max_train_samples=64,
            output_dir=str(tmp_path / "tb"), tensorboard=True,
        )
    )  # fmt: skip
    printed = capsys.readouterr().out
    lines = re.findall(r"step +\d/4 \| epoch +[\d.]+ \| loss [\d.]+ \| lr [\d.e+-]+ \|", printed)
    assert len(lines) == 2, printed
    assert "eval @ step 4" in printed and "max |logit diff|" in printed
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert result.metrics


def test_tensorboard_missing_is_a_clean_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(ValueError, match="pip install tensorboard"):
        prepare(FinetuneConfig(**SENTIMENT, tensorboard=True, output_dir=str(tmp_path)))


def test_glue_task_without_files_reads_the_hub_dataset(monkeypatch):
    calls = []
    split = {"sentence1": ["a b", "c d", "e f"], "sentence2": ["a b", "x", "e"], "label": [1, 0, 1]}
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *args: calls.append(args) or {"train": split, "validation": split}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    run = prepare(FinetuneConfig(task="mrpc", max_steps=1, output_dir="unused"))
    assert calls == [("nyu-mll/glue", "mrpc")]
    assert run.metric_names == ("accuracy", "f1") and run.raw.text_columns == (
        "sentence1",
        "sentence2",
    )
    assert run.model.config.num_labels == 2


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train_file": "nope.csv"}, "'nope.csv' does not exist"),
        ({"label_column": "sentiment"}, r"label column 'sentiment' is not in the train data; its columns are \['sentence', 'label'\]"),
        ({"text_columns": "review"}, r"text column 'review' is not in the train data; its columns are \['sentence', 'label'\]"),
        ({"text_columns": "a,b,c"}, "give one column, or two"),
        ({"optimizer": "adamw", "lora_rank": 4}, "need weight normalisation"),
        ({"optimizer": "adamw", "bits": 8}, "--bits 8 needs a projected optimizer"),
        ({"lora_rank": 4, "rank": 8}, "--rank 8 exceeds --lora-rank 4"),
        ({"metric": "pearson"}, "'pearson' does not apply to a classification task"),
        ({"problem_type": "regression", "metric": "accuracy"}, "'accuracy' does not apply to a regression"),
        ({"max_seq_len": 0}, "--max-seq-len must be positive"),
        ({"model": "./missing-model"}, "neither a built-in model"),
        ({"target_modules": "q_proj"}, r"matched no linear layer .* named \['dense', 'key', 'query', 'value'\]"),
        ({"validation_file": str(EXAMPLES / "similarity_validation.jsonl")}, "text column 'sentence' is not in the validation data"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_before_training(tmp_path, overrides, message):
    config = FinetuneConfig(**{**SENTIMENT, "output_dir": str(tmp_path / "o"), **overrides})
    with pytest.raises(ValueError, match=message):
        prepare(config)
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written


def test_unseen_validation_label_and_too_long_sequences(tmp_path, full_run):
    (tmp_path / "t.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n")
    (tmp_path / "v.csv").write_text("text,label\nmeh,neutral\n")
    with pytest.raises(ValueError, match="label 'neutral' is not one of the training labels"):
        prepare(
            FinetuneConfig(
                train_file=str(tmp_path / "t.csv"), validation_file=str(tmp_path / "v.csv")
            )
        )
    _, base = full_run  # its positions hold 128 tokens
    with pytest.raises(ValueError, match="--max-seq-len 512 exceeds the 128 positions"):
        prepare(FinetuneConfig(**SENTIMENT, model=str(base.final_dir), max_seq_len=512))


def test_cli_reports_user_errors_with_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--train-file", "missing.csv"])
    assert exit_info.value.code == 2
    assert (
        "gnlorp-finetune: error: data file 'missing.csv' does not exist" in capsys.readouterr().err
    )
    assert resolve(FinetuneConfig(model="roberta-base")).lr == 3e-5  # pre-trained recipe
    assert resolve(FinetuneConfig()).update_proj_gap == 50  # from-scratch recipe


# ---------------------------------------------------------------------------------- device


def test_device_cuda_without_a_gpu_is_a_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    # Also on a GPU host: what is under test is the answer to torch seeing no CUDA device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o"
    with pytest.raises(
        ValueError, match=r"--device cuda, but torch sees no CUDA device.*--device cpu"
    ):
        prepare(FinetuneConfig(**SENTIMENT, device="cuda", output_dir=str(out)))
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--train-file", SENTIMENT["train_file"], "--device", "cuda", "--output-dir", str(out)]
        )
    assert exit_info.value.code == 2
    assert (
        "gnlorp-finetune: error: --device cuda, but torch sees no CUDA" in capsys.readouterr().err
    )
    assert not out.exists()  # nothing trained, nothing written


def test_device_cpu_trains_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "cpu"
    args = ["--train-file", SENTIMENT["train_file"], "--validation-file"]
    args += [SENTIMENT["validation_file"], "--device", "cpu", "--max-steps", "2"]
    args += ["--max-train-samples", "32", "--max-eval-samples", "16", "--output-dir", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "batch 16, device cpu" in printed and "TF32" not in printed
    done = next(line for line in printed.splitlines() if line.startswith("done:"))
    assert "samples/s training)" in done and "GPU" not in done
    record = json.loads((out / "metrics.json").read_text())
    assert record["steps"] == 2 and record["config"]["device"] == "cpu"
    assert "gpu_memory" not in record  # peak memory is a GPU figure
    assert record["merged_max_abs_logit_diff"] < 1e-4  # the reload check ran on the CPU too


def test_no_tf32_flag():
    from gnlorp_dist.finetune.config import config_from_args

    assert config_from_args([]).tf32 is True
    assert config_from_args(["--no-tf32"]).tf32 is False
