"""loracls.data: reading every supported format, label and column detection, the validation split, and
one-line LoraclsErrors for hostile input.  Fast, CPU-only, offline."""

from __future__ import annotations

import csv
import json
import os
import pickle
import sys
import time
import types
from collections import Counter

import pytest

from loracls.data import readers
from loracls.data import Examples, find_label_names_file, read_examples, split_validation
from loracls.errors import LoraclsError

AG_NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return str(path)


def fails(source, *fragments, **kwargs) -> str:
    """read_examples must raise a one-line LoraclsError mentioning every fragment."""
    with pytest.raises(LoraclsError) as info:
        read_examples(source, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for frag in fragments:
        assert frag.lower() in msg.lower(), (frag, msg)
    return msg


# -- the real AG News files ----------------------------------------------------------------------------------------


def test_agnews_train(agnews_dir):
    start = time.perf_counter()
    ex, names = read_examples(str(agnews_dir / "train.csv"))
    elapsed = time.perf_counter() - start
    assert len(ex) == 33_333 and ex.rows == list(range(33_333))
    assert names.names == AG_NAMES
    assert set(ex.labels) == {0, 1, 2, 3}
    assert ex.ids is None and ex.skipped_empty == 0
    with open(agnews_dir / "train.csv", newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(3), csv.reader(f))]
    for i, (cls, title, desc) in enumerate(rows):
        assert ex.texts[i] == title + " " + desc
        assert ex.labels[i] == int(cls) - 1
    assert elapsed < 3.0, elapsed  # typically ~0.3 s


def test_agnews_test_balanced(agnews_dir):
    ex, names = read_examples(str(agnews_dir / "test.csv"))
    assert len(ex) == 7_600 and names.names == AG_NAMES
    assert Counter(ex.labels) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}


def test_agnews_predict_and_column_indices(small_agnews):
    src = str(small_agnews / "test.csv")
    ex, names = read_examples(src, require_labels=False)
    assert ex.labels is None and len(ex) == 120 and names.names == AG_NAMES
    full, _ = read_examples(src)
    assert ex.texts == full.texts  # the label column never leaks into the text
    desc, _ = read_examples(src, text_columns=["2"], label_column="0")
    with open(src, newline="", encoding="utf-8") as f:
        first = next(csv.reader(f))
    assert desc.texts[0] == first[2] and desc.labels == full.labels
    fails(src, "no header", "0-based", text_columns=["title", "description"])
    fails(src, "out of range", "3 columns", text_columns=["5"])


def test_agnews_evaluate_with_given_names(small_agnews):
    ex, names = read_examples(str(small_agnews / "test.csv"), label_names=AG_NAMES)
    assert names.names == AG_NAMES and set(ex.labels) <= {0, 1, 2, 3}
    fails(str(small_agnews / "test.csv"), "valid labels are 1..2", label_names=["a", "b"])


# -- formats ----------------------------------------------------------------------------------------------------------


def test_csv_with_header_string_labels(tmp_path):
    src = write(tmp_path / "d.csv", "id,text,label\n7,good movie,pos\n8,\"bad, very bad\",neg\n9,fine,pos\n")
    ex, names = read_examples(src)
    assert names.names == ["neg", "pos"]  # sorted unique values
    assert ex.texts == ["good movie", "bad, very bad", "fine"] and ex.labels == [1, 0, 1]
    assert ex.ids == ["7", "8", "9"] and ex.rows == [0, 1, 2] and ex.source == src
    ex, names = read_examples(src, label_names=["pos", "neg"])
    assert names.names == ["pos", "neg"] and ex.labels == [0, 1, 0]
    fails(src, "line 3", "'neg'", "pos", label_names=["pos", "neutral"])


def test_csv_header_detection_variants(tmp_path):
    src = write(tmp_path / "d.csv", "Class Index,Title,Description\n1,t1,d1\n2,t2,d2\n")
    ex, names = read_examples(src)
    # integer labels start at their smallest value: no empty class "0" (issue 23)
    assert ex.texts == ["t1 d1", "t2 d2"] and names.names == ["1", "2"] and ex.labels == [0, 1]
    src = write(tmp_path / "e.csv", ",sentence,category\n0,hello,a\n1,world,b\n")  # pandas index column
    ex, names = read_examples(src)
    assert ex.texts == ["hello", "world"] and names.names == ["a", "b"]
    src = write(tmp_path / "f.csv", "body,stars\nnice,5\nmeh,2\n")  # single remaining string column
    ex, names = read_examples(src, label_column="stars")
    assert ex.texts == ["nice", "meh"] and ex.labels == [3, 0] and names.names == ["2", "3", "4", "5"]
    src = write(tmp_path / "g.csv", "review,target\n\"multi\nline\",0\nok,1\n")
    ex, _ = read_examples(src)
    assert ex.texts == ["multi\nline", "ok"] and ex.rows == [0, 1]


def test_tsv_txt_and_text_lines(tmp_path):
    src = write(tmp_path / "d.tsv", "sentence\tlabel\nhi there\t1\nbye\t0\n")
    ex, names = read_examples(src)
    assert ex.texts == ["hi there", "bye"] and ex.labels == [1, 0] and names.names == ["0", "1"]
    src = write(tmp_path / "tab.txt", "2\tSome, title\tdesc\n1\tother\tthing\n")
    ex, names = read_examples(src)
    assert ex.texts == ["Some, title desc", "other thing"] and ex.labels == [1, 0]
    src = write(tmp_path / "comma.txt", "label,text\n0,a b\n1,c d\n")
    assert read_examples(src)[0].texts == ["a b", "c d"]
    src = write(tmp_path / "lines.txt", "first text, with a comma\nsecond one\n\n   \nthird\n")
    ex, names = read_examples(src, require_labels=False)
    assert ex.texts == ["first text, with a comma", "second one", "third"] and ex.labels is None
    assert ex.skipped_empty == 1 and names.names == []


def test_jsonl_and_json(tmp_path):
    lines = [{"text": "a", "label": "x", "guid": 1}, {"text": "b", "label": "y", "guid": 2}, {"text": "c", "label": "x", "guid": 3}]
    src = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    ex, names = read_examples(src)
    assert ex.texts == ["a", "b", "c"] and ex.labels == [0, 1, 0] and names.names == ["x", "y"] and ex.ids == ["1", "2", "3"]
    src = write(tmp_path / "arr.json", json.dumps(lines, indent=2))
    assert read_examples(src)[0].texts == ["a", "b", "c"]
    src = write(tmp_path / "lines.json", "\n".join(json.dumps(r) for r in lines))
    assert read_examples(src)[0].labels == [0, 1, 0]
    src = write(tmp_path / "cols.json", json.dumps({"text": ["u", "v"], "label": [1, 0]}))
    assert read_examples(src)[0].labels == [1, 0]
    src = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1\n')
    fails(src, "line 2", "not valid json")
    src = write(tmp_path / "notobj.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n')
    fails(src, "line 2", "not an object")
    src = write(tmp_path / "missing.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n')
    fails(src, "line 2", "no label")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": ["a", "b", " "], "label": [1, 0, 1]})
    meta = {"info": {"features": {"text": {"dtype": "string", "_type": "Value"},
                                  "label": {"names": ["neg", "pos"], "_type": "ClassLabel"}}}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    pq.write_table(table, tmp_path / "d.parquet")
    ex, names = read_examples(str(tmp_path / "d.parquet"))
    assert ex.texts == ["a", "b"] and ex.labels == [1, 0] and names.names == ["neg", "pos"] and ex.skipped_empty == 1
    ex, names = read_examples(str(tmp_path / "d.parquet"), label_names=["pos", "neg"])  # mapped by name
    assert ex.labels == [0, 1] and names.names == ["pos", "neg"]
    write(tmp_path / "broken.parquet", b"PAR1 not really")
    fails(str(tmp_path / "broken.parquet"), "parquet")


class FrameLike:
    """Stands in for a pandas DataFrame: only `to_dict(orient='list')`."""

    def __init__(self, cols):
        self.cols = cols

    def to_dict(self, orient="dict"):
        assert orient == "list"
        return self.cols


@pytest.mark.parametrize("obj", [
    {"text": ["a", "b"], "label": ["n", "p"]},
    [{"text": "a", "label": "n"}, {"text": "b", "label": "p"}],
    FrameLike({"text": ["a", "b"], "label": ["n", "p"]}),
], ids=["dict-of-lists", "list-of-dicts", "dataframe-like"])
def test_pickle(tmp_path, obj):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(obj))
    fails(str(path), "--allow-pickle", "trust")
    with pytest.warns(UserWarning, match="runs code"):
        ex, names = read_examples(str(path), allow_pickle=True)
    assert ex.texts == ["a", "b"] and ex.labels == [0, 1] and names.names == ["n", "p"]


def test_pickle_garbage(tmp_path):
    write(tmp_path / "bad.pickle", b"\x80\x04not a pickle")
    with pytest.warns(UserWarning):
        fails(str(tmp_path / "bad.pickle"), "cannot unpickle", allow_pickle=True)
    (tmp_path / "num.pkl").write_bytes(pickle.dumps(42))
    with pytest.warns(UserWarning):
        fails(str(tmp_path / "num.pkl"), "holds a int", allow_pickle=True)


# -- labels -----------------------------------------------------------------------------------------------------------


def test_one_based_and_zero_based(tmp_path):
    # headerless 1..K: 1-based, names "1".."K" without classes.txt
    src = write(tmp_path / "h.csv", "1,a\n2,b\n3,c\n")
    ex, names = read_examples(src)
    assert ex.labels == [0, 1, 2] and names.names == ["1", "2", "3"]
    # headerless with a 0: 0-based
    src = write(tmp_path / "h0.csv", "0,a\n2,b\n")
    ex, names = read_examples(src)
    assert ex.labels == [0, 2] and names.names == ["0", "1", "2"]
    # header without classes.txt: from the smallest label (issue 23: no empty class "0")
    src = write(tmp_path / "hdr.csv", "label,text\n1,a\n2,b\n")
    ex, names = read_examples(src)
    assert ex.labels == [0, 1] and names.names == ["1", "2"]
    # header with classes.txt beside: 1..K is 1-based, a 0 makes it 0-based
    sub = tmp_path / "withnames"
    sub.mkdir()
    write(sub / "classes.txt", "neg\npos\n\n")
    src = write(sub / "hdr.csv", "label,text\n1,a\n2,b\n")
    ex, names = read_examples(src)
    assert ex.labels == [0, 1] and names.names == ["neg", "pos"]
    src = write(sub / "zero.csv", "label,text\n0,a\n1,b\n")
    assert read_examples(src)[0].labels == [0, 1]
    src = write(sub / "out.csv", "label,text\n0,a\n2,b\n")
    fails(src, "line 3", "label 2", "0..1", "classes.txt")
    src = write(sub / "names.csv", "label,text\npos,a\nneg,b\n")
    assert read_examples(src)[0].labels == [1, 0]
    src = write(sub / "unknown.csv", "label,text\npos,a\nmaybe,b\n")
    fails(src, "line 3", "'maybe'", "neg, pos")


def test_label_edge_cases(tmp_path):
    fails(write(tmp_path / "neg.csv", "label,text\n0,a\n-1,b\n"), "line 3", "-1")
    fails(write(tmp_path / "empty.csv", "label,text\n0,a\n,b\n"), "line 3", "no label")
    # decimal labels (few distinct values) are classes by value: 0.5 and "0.50" are one class (issue 23)
    ex, names = read_examples(write(tmp_path / "frac.jsonl", '{"text": "a", "label": 0.5}\n'
                                                             '{"text": "b", "label": "0.50"}\n{"text": "c", "label": 2}\n'))
    assert ex.labels == [0, 0, 1] and names.names == ["0.5", "2"]
    fails(write(tmp_path / "nolabel.csv", "text,other\na,b\n"), "no label column", "--label-column")
    fails(write(tmp_path / "nolabel2.csv", "hello there, friend\nsecond, row\n"), "--label-column")
    ex, _ = read_examples(write(tmp_path / "floatint.jsonl", '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n'))
    assert ex.labels == [1, 0]
    ex, names = read_examples(write(tmp_path / "strnames.csv", "0,x\n"), label_names=["zero", "one"])
    assert ex.labels == [0] and names.names == ["zero", "one"]


def test_find_label_names_file(tmp_path):
    src = write(tmp_path / "d.csv", "label,text\n0,a\n")
    assert find_label_names_file(src) is None
    write(tmp_path / "labels.txt", "a\nb\n")
    assert find_label_names_file(src) == ["a", "b"]
    write(tmp_path / "classes.txt", "x\ny\nz\n")
    assert find_label_names_file(src) == ["x", "y", "z"]
    assert find_label_names_file("ag_news") is None
    write(tmp_path / "classes.txt", "x\n\ny\n")
    with pytest.raises(LoraclsError, match="line 2"):
        find_label_names_file(src)


# -- validation split -------------------------------------------------------------------------------------------------


def _examples(n):
    return Examples(texts=[f"t{i}" for i in range(n)], labels=[i % 3 for i in range(n)], rows=list(range(n)),
                    ids=None, source="mem")


def test_split_validation():
    ex = _examples(101)
    tr, va = split_validation(ex, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 91
    assert set(tr.rows).isdisjoint(va.rows) and sorted(tr.rows + va.rows) == list(range(101))
    assert tr.rows == sorted(tr.rows) and va.rows == sorted(va.rows)
    assert va.texts == [f"t{i}" for i in va.rows] and va.labels == [i % 3 for i in va.rows]
    tr2, va2 = split_validation(ex, 0.1, seed=3)
    assert va2.rows == va.rows and tr2.rows == tr.rows
    assert split_validation(ex, 0.1, seed=4)[1].rows != va.rows
    assert len(split_validation(_examples(5), 0.01, 0)[1]) == 1  # at least one
    assert len(split_validation(_examples(2), 0.9, 0)[0]) == 1  # never everything
    tr, va = split_validation(ex, 0.0, 0)
    assert len(tr) == 101 and len(va) == 0
    with pytest.raises(LoraclsError):
        split_validation(ex, 1.5, 0)


def test_subset_keeps_fields():
    ex = Examples(texts=["a", "b", "c"], labels=[0, 1, 0], rows=[0, 2, 3], ids=["x", "y", "z"], source="s",
                  skipped_empty=1)
    sub = ex.subset([2, 0])
    assert (sub.texts, sub.labels, sub.rows, sub.ids, sub.source, sub.skipped_empty) == \
        (["c", "a"], [0, 0], [3, 0], ["z", "x"], "s", 1)


# -- hostile input ----------------------------------------------------------------------------------------------------


def test_missing_file_directory_and_extension(tmp_path):
    fails(str(tmp_path / "nope.csv"), "does not exist")
    fails("./nope", "does not exist")
    write(tmp_path / "train.csv", "label,text\n0,a\n")
    fails(str(tmp_path / "trian.csv"), "does not exist", "train.csv")  # suggests the close name
    fails(str(tmp_path), "directory")
    fails(write(tmp_path / "d.xlsx", "x"), "unsupported", ".csv")


def test_unreadable_file(tmp_path, monkeypatch):
    src = write(tmp_path / "d.csv", "label,text\n0,a\n")
    os.chmod(src, 0)
    try:
        if os.access(src, os.R_OK):  # running as root: simulate the permission error instead
            def deny(*args, **kwargs):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(readers, "open", deny, raising=False)
        fails(src, "permission denied")
    finally:
        os.chmod(src, 0o644)


def test_empty_and_header_only(tmp_path):
    fails(write(tmp_path / "empty.csv", ""), "is empty")
    fails(write(tmp_path / "blank.csv", "\n  \n"), "is empty")
    fails(write(tmp_path / "empty.jsonl", "\n"), "is empty")
    fails(write(tmp_path / "header.csv", "label,text\n"), "header", "no data rows")
    fails(write(tmp_path / "empty.json", "[]"), "empty")


def test_wrong_separator(tmp_path):
    fails(write(tmp_path / "semi.csv", "label;text\n0;a, b\n1;c\n"), "semicolon-separated")
    fails(write(tmp_path / "tabs.csv", "label\ttext\n0\ta\n1\tc\n"), "tab-separated", ".tsv")
    fails(write(tmp_path / "comma.tsv", "label,text\n0,a\n1,c\n"), "comma-separated", ".csv")


def test_ragged_rows(tmp_path):
    fails(write(tmp_path / "d.csv", "label,text\n0,a\n1,b,extra\n0,c\n"), "line 3", "3 fields", "2")
    fails(write(tmp_path / "q.csv", "label,text\n0,\"a\nb\"\n1,b,x\n"), "line 4")  # physical line after a multi-line field
    fails(write(tmp_path / "open.csv", "label,text\n0,a\n1,\"b\n0,c\n"), "line 3", "never closed")


def test_encoding_problems(tmp_path):
    fails(write(tmp_path / "latin.csv", "label,text\n0,ok\n1,caf\xe9\n".encode("latin-1")), "line 3", "utf-8")
    fails(write(tmp_path / "nul.csv", b"label,text\n0,ok\n1,a\x00b\n"), "nul", "line 3")
    fails(write(tmp_path / "u16.csv", "label,text\n0,a\n".encode("utf-16")), "utf-16")
    bom = write(tmp_path / "bom.csv", b"\xef\xbb\xbflabel,text\n0,a\n")
    assert read_examples(bom)[0].texts == ["a"]


def test_empty_texts(tmp_path):
    ex, _ = read_examples(write(tmp_path / "d.csv", "label,title,description\n0,,\n1,  ,\t\n0,a,\n1,, b\n"))
    assert ex.texts == ["a ", "  b"] and ex.rows == [2, 3] and ex.skipped_empty == 2
    fails(write(tmp_path / "all.csv", "label,text\n0,\n1, \n"), "all 2 rows", "empty text")


def test_duplicate_ids(tmp_path):
    fails(write(tmp_path / "d.csv", "id,text,label\na,x,0\nb,y,1\na,z,0\n"), "duplicate id 'a'", "line 2", "line 4")


def test_unknown_columns(tmp_path):
    src = write(tmp_path / "d.csv", "label,text,extra\n0,a,b\n")
    fails(src, "'body'", "available columns", "'text'", text_columns=["body"])
    fails(src, "'lable'", "did you mean 'label'", label_column="lable")
    fails(write(tmp_path / "two.csv", "label,alpha,beta\n0,a,b\n"), "several columns", "--text-columns")
    ex, _ = read_examples(src, text_columns=["text", "extra"])
    assert ex.texts == ["a b"]


def test_huge_field(tmp_path):
    big = "x" * 10_000_000
    ex, _ = read_examples(write(tmp_path / "d.csv", f"label,text\n0,\"{big}\"\n1,small\n"))
    assert len(ex.texts[0]) == 10_000_000 and ex.texts[1] == "small"


# -- hub sources ------------------------------------------------------------------------------------------------------


def test_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    fails("ag_news", "'ag_news'", "local file path", "loracls[hub]")
    fails("someone/dataset:test", "someone/dataset", "loracls[hub]")


class _ClassLabel:
    def __init__(self, names):
        self.names = names


_ClassLabel.__name__ = "ClassLabel"


class _FakeDataset:
    def __init__(self, cols, features):
        self.cols, self.features = cols, features
        self.column_names = list(cols)

    def __getitem__(self, key):
        return self.cols[key]


def test_hub_with_fake_datasets(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "missing":
            raise FileNotFoundError("Dataset 'missing' doesn't exist on the Hub\nor cannot be accessed")
        return _FakeDataset({"text": ["a", "b"], "label": [1, 0]}, {"text": object(), "label": _ClassLabel(["n", "p"])})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ex, names = read_examples("owner/sst:validation")
    assert calls[-1] == ("owner/sst", "validation") and ex.labels == [1, 0] and names.names == ["n", "p"]
    assert ex.source == "owner/sst:validation"
    read_examples("ag_news", default_split="test")
    assert calls[-1] == ("ag_news", "test")
    fails("missing", "'missing'", "local file path")


def test_predict_tolerates_missing_label_column(tmp_path):
    src = write(tmp_path / "d.csv", "text\nhello\nworld\n")
    ex, names = read_examples(src, label_column="label", require_labels=False, label_names=["a", "b"])
    assert ex.texts == ["hello", "world"] and ex.labels is None and names.names == ["a", "b"]
    fails(src, "label column 'label'", label_column="label")
    src = write(tmp_path / "h.csv", "1,hello\n2,world\n")
    ex, _ = read_examples(src, label_column="label", require_labels=False)
    assert ex.texts == ["hello", "world"]
