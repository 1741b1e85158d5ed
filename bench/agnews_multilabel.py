"""A real-text multi-label data set from the shared AG News files, for docs/results.md's multi-label run.

Each row is one AG News article (its own class as its one label) or, for about half the rows, two articles of
different classes joined, carrying both labels ("World,Sports").  The texts are AG News' own; only the pairing
is made up, so the labels stay exactly right.  Train rows come from the shared train.csv, test rows from the
official test.csv: no article is in both.

    python bench/agnews_multilabel.py OUT_DIR [--train-rows 8000] [--test-rows 2000] [--seed 0]

writes OUT_DIR/train.csv and OUT_DIR/test.csv with a header `text,labels`.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"


def _articles(path: Path, names: list[str]) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(names[int(c) - 1], f"{title}. {description}") for c, title, description in csv.reader(f)]


def build(articles: list[tuple[str, str]], rows: int, seed: int) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    pool = articles[:]
    rnd.shuffle(pool)
    out, i = [], 0
    while len(out) < rows and i + 1 < len(pool):
        (a, ta), (b, tb) = pool[i], pool[i + 1]
        if a == b or rnd.random() < 0.5:
            out.append((ta, a))
            i += 1
        else:
            out.append((f"{ta} {tb}", f"{a},{b}"))
            i += 2
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--test-rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ag-news", type=Path, default=SHARED, help="the folder of train.csv, test.csv, classes.txt")
    args = p.parse_args()
    names = (args.ag_news / "classes.txt").read_text(encoding="utf-8").split()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", args.train_rows, args.seed), ("test", args.test_rows, args.seed + 1)):
        rows = build(_articles(args.ag_news / f"{split}.csv", names), n, seed)
        with open(args.out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "labels"])
            w.writerows(rows)
        print(f"wrote {len(rows)} rows to {args.out / f'{split}.csv'}")


if __name__ == "__main__":
    main()
