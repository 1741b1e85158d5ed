"""Reading labelled (or unlabelled) text from a local file or a hub dataset.

    readers.py    one reader per format -> a column-major Table (delimited files: Records until the header is
                  decided)
    columns.py    the header decision, and which columns hold text, label and ids
    labels.py     how labels become class ids (`Labels`, decided once from the training data; `label_key`)
    detect.py     label columns that classes would misread (row ids, regression targets, label lists, ...)
    examples.py   `read_examples` ties them together; the seeded validation split
    splits.py     a run's tokenized train / validation / test splits, and the data summary

Every problem a user can cause (missing file, bad encoding, ragged rows, unknown label, ...) raises a
`LoraclsError` with a one-line message naming the problem, where it is (line number) and the fix.  Nothing is
returned until the whole source has been read and checked.
"""

from loracls.data.common import MissingColumn
from loracls.data.examples import Examples, read_examples, split_validation
from loracls.data.labels import Labels
from loracls.data.readers import find_label_names_file
from loracls.data.splits import (Split, columns_read, held_out, load_splits, read_options, read_with_columns,
                                 resolved_columns, summary, summary_lines)

__all__ = ["Examples", "Labels", "MissingColumn", "Split", "columns_read", "find_label_names_file", "load_splits",
           "read_examples", "held_out", "read_options", "read_with_columns", "resolved_columns", "split_validation",
           "summary", "summary_lines"]
