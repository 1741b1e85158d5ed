"""A user's own data (issue 23): each layout that used to be read silently wrong, built from real rows of AG News
and the GLUE files in ../shared, is either refused in one line that names the column and the flag that decides, or
read correctly; the data summary says what was read; train and evaluate map every label the same way."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from helpers import train_args
from loracls.cli import main
from loracls.data import read_examples
from loracls.data.labels import map_labels
from loracls.errors import LoraclsError

AG_NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def ag_rows(agnews_dir) -> list[tuple[int, str, str]]:
    """The first 900 rows of the real AG News train file: (class 1-4, title, description)."""
    with open(agnews_dir / "train.csv", newline="", encoding="utf-8") as f:
        return [(int(c), t, d) for (c, t, d), _ in zip(csv.reader(f), range(900))]


@pytest.fixture(scope="session")
def glue_dir(shared_dir) -> Path:
    folder = shared_dir / "data" / "glue"
    if not (folder / "stsb" / "train.tsv").is_file():
        pytest.skip(f"GLUE files not found at {folder}")
    return folder


def write_csv(path: Path, rows, header=None) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return str(path)


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def refused(source, *fragments, **kwargs) -> str:
    """read_examples must refuse in one line that holds every fragment."""
    with pytest.raises(LoraclsError) as info:
        read_examples(source, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


# -- label columns that classes would misread -------------------------------------------------------------------


def test_headerless_row_id_first_column_is_refused_and_the_class_column_read(ag_rows, tmp_path):
    # The issue's layout: a row id first, then AG News' own columns; the id used to become the label.
    src = write_csv(tmp_path / "with_ids.csv", [(1000 + i, c, t, d) for i, (c, t, d) in enumerate(ag_rows)])
    refused(src, "column '0'", "row ids", "--label-column", "column '1' holds 4 distinct values")
    ex, labels = read_examples(src, label_column="1")
    assert labels.names == ["1", "2", "3", "4"] and ex.labels == [c - 1 for c, _, _ in ag_rows]
    # the id is a number, never text: the text is title + description, as in the original layout
    assert ex.texts == [f"{t} {d}" for _, t, d in ag_rows]
    assert ex.reading["text_columns"] == ["2", "3"] and ex.reading["label_column"] == "1"


def test_stars_with_a_header_start_at_their_smallest_value(ag_rows, tmp_path):
    records = [{"review": f"{t} {d}", "stars": c} for c, t, d in ag_rows]
    src = write_jsonl(tmp_path / "stars.jsonl", records)
    ex, labels = read_examples(src, label_column="stars")
    assert labels.names == ["1", "2", "3", "4"] and labels.values == ["1", "2", "3", "4"]  # no empty class "0"
    assert ex.labels == [c - 1 for c, _, _ in ag_rows]
    # a later file holding only stars 3 and 4 maps through the run's classes, not from its own smallest value
    later = write_jsonl(tmp_path / "later.jsonl", [r for r in records if r["stars"] >= 3])
    got, same = read_examples(later, label_column="stars", labels=labels)
    assert same == labels and got.labels == [r["stars"] - 1 for r in records if r["stars"] >= 3]


def test_labels_equal_but_for_case_are_refused_or_decided_by_label_case(ag_rows, tmp_path):
    spell = (str, str.lower, str.upper)
    records = [{"text": f"{t} {d}", "label": spell[i % 3](AG_NAMES[c - 1])} for i, (c, t, d) in enumerate(ag_rows)]
    src = write_jsonl(tmp_path / "cased.jsonl", records)
    refused(src, "column 'label'", "equal but for case", "--label-case fold", "--label-case exact")
    ex, folded = read_examples(src, label_case="fold")
    assert len(folded) == 4 and sorted(n.casefold() for n in folded.names) == sorted(n.casefold() for n in AG_NAMES)
    assert [folded.names[j].casefold() for j in ex.labels] == [r["label"].casefold() for r in records]
    ex, exact = read_examples(src, label_case="exact")
    assert len(exact) == 12 and [exact.names[j] for j in ex.labels] == [r["label"] for r in records]
    # evaluate and predict map a file's labels through the same rule as training did
    raw = [r["label"] for r in records]
    for case, labels, train_ids in (("fold", folded, read_examples(src, label_case="fold")[0].labels),
                                    ("exact", exact, ex.labels)):
        mapped = map_labels(raw, lambda i: f"row {i}", src="x", column="label", names=labels.names,
                            values=labels.values, format_names=None, case=case)
        assert mapped == train_ids


def test_float_scores_are_a_regression_target(glue_dir, tmp_path):
    # STS-B's test.tsv has a header and its 0-5 similarity score, written "3.2", "3.200" or "3.20" by its
    # sources; the run made 108 classes of them.  Every 10th row: 150 rows of every source.
    lines = (glue_dir / "stsb" / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    lines = lines[:1] + lines[10::10]
    src = tmp_path / "stsb.tsv"
    src.write_text("".join(lines), encoding="utf-8")
    refused(str(src), "column 'score'", "regression target", "distinct decimal values", "--label-column",
            text_columns=["sentence1", "sentence2"], label_column="score")
    # asked to, each value is a class, compared by value: "3.2" and "3.200" are one class
    ex, labels = read_examples(str(src), text_columns=["sentence1", "sentence2"], label_column="score",
                               labels_as_names=True)
    scores = [line.rstrip("\n").split("\t")[-1] for line in lines[1:]]
    assert len(set(map(float, scores))) == len(labels) < len(set(scores))
    assert [float(labels.names[j]) for j in ex.labels] == [float(s) for s in scores]


def test_delimited_label_lists_are_multi_label_or_refused(ag_rows, tmp_path):
    records = []
    for i, ((c1, t1, _), (c2, t2, _)) in enumerate(zip(ag_rows[::2], ag_rows[1::2])):
        a, b = AG_NAMES[c1 - 1], AG_NAMES[c2 - 1]
        records.append({"text": f"{t1} {t2}", "label": a if a == b else f"{a},{b}"})
    src = write_jsonl(tmp_path / "lists.jsonl", records)
    assert {"World,Sports", "Sports,World"} <= {r["label"] for r in records}
    # under --task auto the lists make the run multi-label; a single-label run refuses them in one line
    ex, labels = read_examples(src)
    assert ex.reading["task"] == "multi-label" and ex.reading["label_separator"] == ","
    assert sorted(labels.names) == sorted(AG_NAMES)
    assert [{labels.names[j] for j, v in enumerate(row) if v} for row in ex.labels] == \
        [set(r["label"].split(",")) for r in records]
    refused(src, "column 'label'", "lists of labels", "single-label", "--task multi-label", "--labels-as-names",
            task="single-label")
    # without a label of its own and in one order only, the parts are not labels: a comma in a class name is fine
    only_pairs = [r for r in records if r["label"] in ("World,Sports", "Business,Sci/Tech")]
    ex, labels = read_examples(write_jsonl(tmp_path / "names.jsonl", only_pairs))
    assert labels.names == ["Business,Sci/Tech", "World,Sports"]


def test_string_ids_and_integer_codes_are_refused(ag_rows, tmp_path):
    src = write_csv(tmp_path / "titles.csv", [(d, t) for _, t, d in ag_rows], header=["text", "label"])
    refused(src, "column 'label'", "row ids", "900 distinct values in 900 rows", "--labels-as-names")
    codes = {1: 200, 2: 301, 3: 404, 4: 500}
    src = write_csv(tmp_path / "codes.csv", [(t, codes[c]) for c, t, _ in ag_rows], header=["text", "label"])
    refused(src, "integer codes", "301 classes", "--labels-as-names")
    ex, labels = read_examples(src, labels_as_names=True)
    assert labels.names == ["200", "301", "404", "500"] and ex.labels == [c - 1 for c, _, _ in ag_rows]


def test_headerless_agnews_reads_as_before(agnews_dir):
    ex, labels = read_examples(str(agnews_dir / "test.csv"))
    assert labels.names == AG_NAMES and labels.values == ["1", "2", "3", "4"] and Counter(ex.labels)[0] == 1900
    assert ex.reading["text_columns"] == ["1", "2"] and ex.reading["label_column"] == "0"
    assert "CSV, comma-separated" in ex.reading["layout"] and "no header row" in ex.reading["layout"]


def test_a_headerless_regression_file_whose_first_column_counts_rows_is_refused(glue_dir):
    """STS-B as GLUE ships it has no header and its row index first: under --task regression that index used to
    become the target.  It is refused, and naming the score column reads the scores."""
    src = str(glue_dir / "stsb" / "train.tsv")
    refused(src, "column '0'", "row ids", "regression", "--label-column", task="regression")
    ex, _ = read_examples(src, text_pair_columns=["7", "8"], label_column="9", task="regression")
    lines = Path(src).read_text(encoding="utf-8").splitlines()
    assert ex.labels == [float(line.split("\t")[9]) for line in lines]


@pytest.mark.parametrize("marker", ["nan", "NaN", "N/A", "null"])
def test_a_missing_value_marker_among_numeric_labels_is_a_missing_label_not_a_class(ag_rows, tmp_path, marker):
    rows = [(t, c - 1) for c, t, _ in ag_rows[:60]]
    rows[5] = (rows[5][0], marker)
    src = write_csv(tmp_path / "labels.csv", rows, header=["text", "label"])
    refused(src, "line 7", repr(marker), "missing value", "fill in")
    # class names that happen to be such words stay names
    named = write_csv(tmp_path / "named.csv", [(t, ["none", "some", "many"][i % 3]) for i, (_, t, _) in
                                                enumerate(ag_rows[:60])], header=["text", "label"])
    assert read_examples(named)[1].names == ["many", "none", "some"]


# -- delimited files as users have them ---------------------------------------------------------------------------


def test_glue_tsv_with_a_stray_quote_is_read_by_default(glue_dir, tmp_path):
    src = str(glue_dir / "stsb" / "train.tsv")
    ex, _ = read_examples(src, text_columns=["7", "8"], require_labels=False)
    lines = Path(src).read_text(encoding="utf-8").splitlines()
    assert len(ex) == len(lines) == 4249
    assert ex.texts == [" ".join(line.split("\t")[7:9]) for line in lines]  # every line, split on tabs alone
    assert ex.texts[1487].startswith('"Then the captain was gone.')
    assert "quotes read as text" in ex.reading["layout"] and "line 1488" in ex.reading["layout"]
    # insisting on CSV quoting names the quote and the line it opens on, and the way out
    refused(src, "line 1488", '(")', "--quoting none", text_columns=["7", "8"], require_labels=False,
            quoting="csv")
    # a quoted TSV still reads as CSV under auto: a quoted field may hold a tab and a line break
    quoted = tmp_path / "quoted.tsv"
    quoted.write_text('text\tlabel\n"one\ttab"\ta\n"two\nlines"\tb\nplain\ta\n', encoding="utf-8")
    ex, _ = read_examples(str(quoted))
    assert ex.texts == ["one\ttab", "two\nlines", "plain"]
    written = tmp_path / "written.tsv"  # as a CSV writer quotes: the field enclosed, the quotes inside doubled
    written.write_text('text\tlabel\n"say ""hi"""\ta\nplain\tb\n', encoding="utf-8")
    assert read_examples(str(written))[0].texts == ['say "hi"', "plain"]
    # asked to read quotes as text, the tab inside the quotes splits that row
    refused(str(quoted), "line 2", "3 fields but line 1 has 2", "quotes read as text", quoting="none")


def test_rte_tsv_reads_with_quotes_as_text(glue_dir):
    ex, labels = read_examples(str(glue_dir / "rte" / "dev.tsv"), text_columns=["sentence1", "sentence2"])
    assert len(ex) == 139 and labels.names == ["entailment", "not_entailment"]
    assert ex.reading["text_columns"] == ["sentence1", "sentence2"] and ex.reading["label_column"] == "label"
    # '"This is a major milestone ...," Obama said' keeps its quotes, which CSV quoting would strip
    assert any(t.startswith('"This is a major milestone') and '," Obama said' in t for t in ex.texts)
    assert "quotes read as text" in ex.reading["layout"]


# -- through the CLI: the summary, the stored columns, train and evaluate agreeing -------------------------------


def run_args(model_dir, train, out, *extra):
    """This file's run: one epoch on the CPU."""
    return train_args(model_dir, train, out, "--epochs", "1", "--batch-size", "16", "--device", "cpu", *extra)


def test_cli_says_what_was_read_and_evaluate_maps_labels_as_train_did(ag_rows, tiny_bert_dir, tmp_path, capsys):
    spell = (str, str.lower, str.upper)
    records = [{"text": f"{t} {d}", "label": spell[i % 3](AG_NAMES[c - 1])}
               for i, (c, t, d) in enumerate(ag_rows[:200])]
    records[5]["text"] = records[9]["text"] = "   "  # dropped, and said so
    src = write_jsonl(tmp_path / "cased.jsonl", records)
    out = tmp_path / "run"
    assert main(run_args(tiny_bert_dir, src, out, "--max-length", "24")) == 2  # refused before any run exists
    err = capsys.readouterr().err
    assert "--label-case" in err and len(err.strip().splitlines()) == 1 and not out.exists()

    assert main(run_args(tiny_bert_dir, src, out, "--max-length", "24", "--label-case", "fold", "--test", src)) == 0
    err = capsys.readouterr().err
    block = [line for line in err.splitlines() if line.startswith("loracls: data:")]
    assert 4 <= len(block) <= 8, err
    text = "\n".join(block)
    assert "text 'text'" in text and "label 'label'" in text and "4 classes" in text
    assert "rows dropped for empty text: train 2" in text and "line 6" in text
    assert "rows truncated to 24 tokens: train" in text
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["text_columns"] == ["text"] and config["data"]["label_column"] == "label"
    assert config["data"]["label_case"] == "fold"
    info = json.loads((out / "run.json").read_text())
    assert info["data"]["classes"] == 4 and info["data"]["text_columns"] == ["text"]
    assert "How the data was read" in (out / "report.md").read_text()

    # evaluate reads the file with the run's columns and label rule: every label lands where training put it
    trained = json.loads((out / "metrics.json").read_text())["test"]
    assert main(["evaluate", str(out), "--data", src, "--json", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["per_class"] == trained["per_class"]
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    # a file laid out otherwise is read with its own columns, said on stderr, its labels mapped the same way
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": r["text"], "category": r["label"]} for r in records])
    assert main(["evaluate", str(out), "--data", other, "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "lacks the run's columns" in captured.err and "text 'body'" in captured.err
    assert json.loads(captured.out)["confusion_matrix"] == trained["confusion_matrix"]


def test_cli_truncated_pairs_are_counted(glue_dir, tiny_bert_dir, tmp_path, capsys):
    lines = (glue_dir / "rte" / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:81]
    src = tmp_path / "rte.tsv"
    src.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "run"
    assert main(run_args(tiny_bert_dir, src, out, "--text-columns", "sentence1,sentence2", "--max-length", "48")) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "rows truncated to 48 tokens" in x)
    assert "the last column first" in line and "train 0 of" not in line
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["text_columns"] == ["sentence1", "sentence2"]
