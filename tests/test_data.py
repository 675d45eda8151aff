"""Readers of the shipped CS224N files, strictness on malformed rows, batching."""
import pytest
import torch

from minbert.model.tokenizer import load_tokenizer
from minbert.tasks.data import (TASKS, DataError, TaskStream, bucketed_batches, load_task, pad, read_task_file,
                                sorted_batches, tensorize)

from .conftest import DATA

EXPECTED_ROWS = {
    ("sst", "train"): 8544, ("sst", "dev"): 1101, ("sst", "test"): 2210,
    ("qqp", "train"): 13998, ("qqp", "dev"): 3000, ("qqp", "test"): 3214,
    ("sts", "train"): 6040, ("sts", "dev"): 863, ("sts", "test"): 1725,
}


@pytest.mark.parametrize("task,split", sorted(EXPECTED_ROWS))
def test_shipped_files_read_completely(task, split):
    data = load_task(task, split, DATA, skip_bad_rows=True)
    assert len(data.examples) == EXPECTED_ROWS[(task, split)]
    assert data.has_labels == (split != "test")
    assert len({ex.id for ex in data.examples}) == len(data.examples)


def test_sst2_is_glue_sst2_built_from_the_sst_files():
    """Neutral sentences (class 2) are outside SST-2: dropped by definition and counted, not reported as bad rows.
    The dev split is GLUE's SST-2 dev set: 872 sentences, 428 negative and 444 positive."""
    sst = {ex.id: ex.label for ex in load_task("sst", "dev", DATA).examples}
    dev = load_task("sst2", "dev", DATA)
    assert len(dev.examples) == 872 and dev.dropped == 229 and not dev.skipped
    assert sum(ex.label == 0 for ex in dev.examples) == 428
    assert all(ex.label == (1 if sst[ex.id] >= 3 else 0) and sst[ex.id] != 2 for ex in dev.examples)
    train = load_task("sst2", "train", DATA)
    assert len(train.examples) + train.dropped == EXPECTED_ROWS[("sst", "train")]
    assert len(load_task("sst2", "test", DATA).examples) == EXPECTED_ROWS[("sst", "test")]  # unlabeled: all kept


def test_sst2_label_out_of_range_names_the_line(tmp_path):
    path = tmp_path / "ids-sst-dev.csv"
    path.write_text("id\tsentence\tsentiment\n0\ta\t0\n1\tb\t5\n")
    with pytest.raises(DataError, match=r"ids-sst-dev\.csv:3: label '5' is out of range \(classes 0\.\.4\)"):
        read_task_file(TASKS["sst2"], path, "dev")


def test_quora_train_unlabeled_rows_are_reported_not_guessed():
    with pytest.raises(DataError, match=r"quora-train\.csv:1848: missing label"):
        load_task("qqp", "train", DATA)
    data = load_task("qqp", "train", DATA, skip_bad_rows=True)
    assert [s.split(": ")[0].rsplit(":", 1)[1] for s in data.skipped] == ["1848", "9889"]
    assert 1848 not in {ex.line for ex in data.examples}


def test_sst_test_file_two_index_columns():
    data = load_task("sst", "test", DATA)
    first = data.examples[0]
    assert first.id == "b7573736a6ddf7be102b7fee0" and first.texts[0].strip() == "Effective but too-tepid biopic"


def test_labels_types_and_ranges():
    sst = load_task("sst", "dev", DATA)
    assert {ex.label for ex in sst.examples} == {0, 1, 2, 3, 4}
    qqp = load_task("qqp", "dev", DATA)
    assert {ex.label for ex in qqp.examples} == {0, 1}
    sts = load_task("sts", "dev", DATA)
    assert all(0.0 <= ex.label <= 5.0 for ex in sts.examples)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


HEADER = "\tid\tsentence\tsentiment\n"


@pytest.mark.parametrize("body,problem", [
    ("0\ta\tgood\t7\n", r":2: label '7' is out of range"),
    ("0\ta\tgood\n", r":2: expected 4 tab-separated fields, found 3"),
    ("0\ta\tgood\tx\n", r":2: label 'x' is not a number"),
    ("0\ta\tgood\t1\n1\ta\tbad\t0\n", r":3: duplicate id 'a' \(first on line 2\)"),
    ("0\ta\t \t1\n", r":2: sentence is empty"),
])
def test_malformed_rows_name_file_and_line(tmp_path, body, problem):
    p = _write(tmp_path, "sst.csv", HEADER + body)
    with pytest.raises(DataError, match=r"sst\.csv" + problem):
        read_task_file(TASKS["sst"], p, "train")


def test_skip_bad_rows_counts_but_range_errors_stay_errors(tmp_path):
    p = _write(tmp_path, "sst.csv", HEADER + "0\ta\tgood\t1\n1\tb\tbad\n2\tc\tfine\t3\n")
    data = read_task_file(TASKS["sst"], p, "train", skip_bad_rows=True)
    assert [ex.id for ex in data.examples] == ["a", "c"] and len(data.skipped) == 1
    p = _write(tmp_path, "sst2.csv", HEADER + "0\ta\tgood\t9\n")
    with pytest.raises(DataError, match="out of range"):
        read_task_file(TASKS["sst"], p, "train", skip_bad_rows=True)


def test_missing_column_and_empty_file(tmp_path):
    p = _write(tmp_path, "s.csv", "\tid\ttext\tsentiment\n0\ta\tgood\t1\n")
    with pytest.raises(DataError, match=r"s\.csv:1: missing column 'sentence'"):
        read_task_file(TASKS["sst"], p, "train")
    p = _write(tmp_path, "e.csv", "")
    with pytest.raises(DataError, match=r"e\.csv:1: empty file"):
        read_task_file(TASKS["sst"], p, "train")
    with pytest.raises(DataError, match="file not found"):
        read_task_file(TASKS["sst"], tmp_path / "nope.csv", "train")


def test_invalid_utf8_names_line(tmp_path):
    p = tmp_path / "u.csv"
    p.write_bytes(HEADER.encode() + b"0\ta\tgood\t1\n1\tb\tba\xffd\t2\n")
    with pytest.raises(DataError, match=r"u\.csv:3: invalid UTF-8"):
        read_task_file(TASKS["sst"], p, "train")


def test_columns_found_by_header_name(tmp_path):
    p = _write(tmp_path, "r.csv", "sentiment\tsentence\tid\n3\tnice film\tx1\n")
    data = read_task_file(TASKS["sst"], p, "train")
    assert (data.examples[0].id, data.examples[0].label) == ("x1", 3)


def test_padding_and_bucketing():
    ids, mask = pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10] * 10
    g = torch.Generator().manual_seed(0)
    batches = bucketed_batches(lengths, 10, g, chunk_batches=5)
    assert sorted(i for b in batches for i in b) == list(range(100))
    for b in batches:  # sorted within chunks: each batch is a contiguous length range
        ls = [lengths[i] for i in b]
        assert max(ls) - min(ls) <= 9
    sb = sorted_batches(lengths, 10)
    assert [lengths[i] for i in sb[0]] == [1] * 10


def test_task_stream_is_deterministic_and_covers_each_pass(small_data):
    tok = load_tokenizer("bert-tiny", 64)
    t = tensorize(load_task("sts", "train", small_data), tok)
    a, b = TaskStream(t, 5, seed=3, task_index=2), TaskStream(t, 5, seed=3, task_index=2)
    n = a.batches_per_pass
    assert n == 10
    first_pass = [i for k in range(n) for i in a.indices(k)]
    assert sorted(first_pass) == list(range(48))
    assert [a.indices(k) for k in range(2 * n)] == [b.indices(k) for k in range(2 * n)]
    assert [a.indices(k) for k in range(n)] != [a.indices(k) for k in range(n, 2 * n)]  # new shuffle per pass
    batch = a.batch(0)
    assert set(batch) == {"input_ids", "attention_mask", "input_ids_b", "attention_mask_b", "labels"}
