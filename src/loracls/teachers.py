"""Distillation's teachers (--teacher): completed runs whose outputs on a student's texts are computed once,
averaged, and stored in the student's run (teacher_outputs.npz, with where they came from).

A teacher may be any completed loracls run (LoRA, DoRA or a full fine-tune; any model family; run by the fast
backend where it applies), of the same task and labels as the student; it reads the student's texts with its own
tokenizer, so families may differ.  Several teachers are averaged: probabilities for classification, values for a
regression.  A resumed student reads the stored outputs back instead of running the teachers again, as long as
the teachers and the texts are the ones they were computed from.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from loracls.atomic import atomic_write_bytes
from loracls.config import RunConfig
from loracls.errors import LoraclsError
from loracls.job import Job, Teachers
from loracls.rundir import TEACHER_OUTPUTS, RunDir
from loracls.tasks import task_of


def teachers_for(config: RunConfig, job: Job, run: RunDir | None = None) -> Teachers | None:
    """The teachers' outputs for every split of `job`: read back from `run` where it stored them for the same
    teachers and texts, else computed (each teacher checked first: completed, same task, labels and text shape)."""
    runs = config.train.teacher
    if not runs:
        return None
    runs = [str(Path(r).expanduser().absolute()) for r in runs]
    source = provenance(runs, job)
    key = json.dumps(source, sort_keys=True)
    outputs = read_stored(run, source) if run is not None else _COMPUTED.get(key)
    if outputs is None:
        for path in runs:
            check_teacher(path, job)
    warnings = leak_warnings(runs, config)
    if run is not None or key not in _COMPUTED:  # once per process: a sweep's trials share teachers
        for warning in warnings:
            print(f"loracls: warning: {warning}", file=sys.stderr)
    if outputs is None:
        t0 = time.perf_counter()
        # Building the teachers draws random numbers: the student's dropout stream must not depend on them (with
        # alpha 0 a student is exactly the plain run).
        cuda = [job.device] if job.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            outputs = compute(runs, job, config)
        _COMPUTED[key] = outputs
        print(f"loracls: teacher outputs from {len(runs)} run(s) on {sum(len(v) for v in outputs.values()):,} "
              f"texts in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    else:
        where = f"from {run.file(TEACHER_OUTPUTS)}" if run is not None else "computed earlier in this process"
        print(f"loracls: teacher outputs read back ({where})", file=sys.stderr)
    trained_on = [outputs[name] for name in ("train", "unlabelled") if name in outputs]  # Job.training_split's rows
    on_device = torch.as_tensor(np.concatenate(trained_on), dtype=torch.float32).to(job.device)
    return Teachers(runs, outputs, on_device, config.train.distill_alpha, config.train.distill_temperature, source,
                    warnings)


# Outputs computed in this process, by provenance: the trials of a sweep that share teachers and data run the
# teachers once.
_COMPUTED: dict[str, dict[str, np.ndarray]] = {}


def check_teacher(path: str, job: Job) -> None:
    """One line where a teacher cannot teach this student: not a completed run, another task, other labels, or
    single texts where the student reads pairs (or the reverse)."""
    try:
        teacher = RunDir.open(path)
    except LoraclsError as e:
        raise LoraclsError(f"--teacher {path!r} is not a loracls run ({e})") from None
    if teacher.info.get("status") != "completed":
        raise LoraclsError(f"--teacher {path!r} is not completed (status {teacher.info.get('status')!r}); finish it "
                           f"with loracls train --resume {path}, or choose another teacher")
    config = teacher.read_config()
    if task_of(config).name != job.task.name:
        raise LoraclsError(f"--teacher {path!r} is a {task_of(config).name} run and this one is {job.task.name}; "
                           "a teacher must do the student's task")
    labels = teacher.read_labels()
    if labels != job.labels.names:
        raise LoraclsError(f"--teacher {path!r} has the labels {labels} and this run {job.labels.names}; a teacher "
                           "must have the student's labels, in the same order")
    pairs = isinstance(job.splits["train"].examples.texts[0], tuple)
    if (config.data.text_pair_columns is not None) != pairs:
        raise LoraclsError(f"--teacher {path!r} reads {'text pairs' if not pairs else 'single texts'} and this run "
                           f"{'text pairs' if pairs else 'single texts'}; a teacher must read the student's texts")


def leak_warnings(runs: list[str], config: RunConfig) -> list[str]:
    """learned_held_out for each teacher still on disk, as lines naming it."""
    out = []
    for path in runs:
        try:
            teacher = RunDir.open(path).read_config()
        except LoraclsError:
            continue  # a resumed student's teacher may be gone: its outputs are stored in the student
        out += [f"--teacher {path} {problem}" for problem in learned_held_out(teacher, config)]
    return out


def learned_held_out(teacher: RunConfig, student: RunConfig) -> list[str]:
    """What the teacher trained on that the student holds out, as far as the two configs tell (same training file):
    a student learning from it is steered toward its validation labels, so its best epoch, early stopping and
    validation figures flatter it; and toward its test labels, so its test figure does too."""
    def source(name: str | None) -> str | None:  # a hub dataset's train split, named or not, is one source
        return name[: -len(":train")] if name and name.endswith(":train") else name

    learned = source(teacher.data.train)
    if learned is None:
        return []
    problems = []
    if source(student.data.test) == learned:
        problems.append(f"trained on this run's test data ({student.data.test}): the student's test figure is not "
                        "evidence; choose a teacher that did not")
    flatters = "the student's best epoch and validation figures flatter it"
    if student.data.validation:
        if source(student.data.validation) == learned:
            problems.append(f"trained on this run's validation data ({student.data.validation}): {flatters}; "
                            "choose a teacher that did not")
        return problems

    def hold_out(c: RunConfig) -> tuple:
        return c.data.validation_fraction, c.data.max_train_samples, c.split_seed

    same_rows = teacher.data.validation is None and teacher.data.validation_fraction > 0 and \
        hold_out(teacher) == hold_out(student)
    if student.data.validation_fraction > 0 and source(student.data.train) == learned and not same_rows:
        problems.append(f"trained on this run's validation rows (it held out others of the same data): {flatters}; "
                        "train teacher and student with one --split-seed, or give a --validation file")
    return problems


def compute(runs: list[str], job: Job, config: RunConfig) -> dict[str, np.ndarray]:
    """Each split's texts through every teacher (its own tokenizer, its fastest torch backend), averaged."""
    from loracls.predictor import open_predictor

    total: dict[str, np.ndarray] = {}
    for path in runs:
        teacher = open_predictor(path, device=config.device, batch_size=config.train.eval_batch_size)
        for name, split in job.splits.items():
            out = teacher.outputs(teacher.tokenize(split.examples.texts)[0]).astype(np.float64)
            total[name] = total[name] + out if name in total else out
        del teacher
    return {name: (v / len(runs)).astype(np.float32) for name, v in total.items()}


def provenance(runs: list[str], job: Job) -> dict:
    """What the outputs depend on: each teacher's saved model (its bytes) and the student's texts, per split."""
    def digest(parts) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(part if isinstance(part, bytes) else json.dumps(part).encode())
        return h.hexdigest()

    models = []
    for path in runs:
        folder = RunDir(Path(path)).adapter
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        models.append(digest([p.name.encode() for p in files] + [p.read_bytes() for p in files]))
    return {"runs": runs, "models": models, "task": job.task.name, "labels": job.labels.names,
            "texts": {name: digest(s.examples.texts) for name, s in job.splits.items()}}


def save(run: RunDir, teachers: Teachers) -> None:
    """The outputs and their provenance, in one file written whole."""
    buf = io.BytesIO()
    np.savez(buf, provenance=np.array(json.dumps(teachers.source)), **teachers.outputs)
    atomic_write_bytes(run.file(TEACHER_OUTPUTS), buf.getvalue())


def read_stored(run: RunDir, source: dict) -> dict[str, np.ndarray] | None:
    """The outputs `run` stored, where they came from the same teachers and texts; else None."""
    path = run.file(TEACHER_OUTPUTS)
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            if json.loads(str(f["provenance"])) != source:
                return None
            return {name: f[name] for name in source["texts"]}
    except (OSError, ValueError, KeyError):
        return None  # torn or foreign: computed again


__all__ = ["check_teacher", "compute", "learned_held_out", "provenance", "read_stored", "save", "teachers_for"]
