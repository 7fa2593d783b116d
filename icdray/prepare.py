"""Prepare stage: MIMIC-IV files -> `prompts/{train,val,test}` parquet, on Ray Data.

Data flow:
  diagnoses_icd + d_icd_diagnoses -> per-admission gold codes  (pyarrow, vectorised; small)
  prescriptions                   -> per-admission drug names  (pyarrow group-by; small)
  note/discharge                  -> Ray Data: read_csv -> map_batches(prepare_batch) -> write_parquet
The two small per-admission tables are broadcast to the map tasks through the object store and
joined per batch (a broadcast hash join), so the large note table is never shuffled. The split is
a seeded hash of `subject_id`, so every task decides it alone and no patient lands in two splits;
or a split file (hadm_id -> split) overrides it.

Bad rows are never fatal and never silent: each reader and `prepare_batch` count drops per reason,
and the report (printed, and written to `prompts/_report.json`) accounts for every input note.
`run_pandas` is the same transformation in one process: the benchmark's reference, and a test
checks both give identical output.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from icdray import layout, mimic, notes, storage
from icdray.config import PrepareConfig
from icdray.layout import SPLITS, Layout

log = logging.getLogger(__name__)
OUTPUT_SCHEMA = pa.schema(
    [
        ("note_id", pa.string()),
        ("hadm_id", pa.int64()),
        ("subject_id", pa.int64()),
        ("note", pa.string()),
        ("medications", pa.list_(pa.string())),
        ("codes", pa.list_(pa.string())),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("split", pa.string()),
        ("drop_reason", pa.string()),
    ]
)


def split_of(subject_id: int, cfg: PrepareConfig) -> str:
    """Deterministic patient-level split from a seeded hash (independent of row order and sharding)."""
    u = zlib.crc32(f"{cfg.split_seed}:{subject_id}".encode()) / 2**32
    return "train" if u < cfg.train_frac else "val" if u < cfg.train_frac + cfg.val_frac else "test"


def prepare_texts(batch: pa.Table, cfg: PrepareConfig) -> pa.Table:
    """Step 1, the heavy one, needs no labels: parse ids, clean and cut every non-empty note."""
    texts = batch["text"].to_pylist()
    prepared = [
        notes.prepare_note(
            t, keep_discharge_diagnosis=cfg.keep_discharge_diagnosis, max_tokens=cfg.max_note_tokens
        )
        if t and t.strip()
        else None
        for t in texts
    ]
    return pa.table(
        {
            "note_id": batch["note_id"],
            "hadm_id": mimic.parse_ids(batch["hadm_id"]),
            "subject_id": mimic.parse_ids(batch["subject_id"]),
            "note": pa.array([p.text if p else None for p in prepared], pa.string()),
            "n_tokens": pa.array([p.n_tokens if p else None for p in prepared], pa.int32()),
            "truncated": pa.array([p.truncated if p else None for p in prepared], pa.bool_()),
        }
    )


def attach_labels(
    texts: pa.Table, labels: pa.Table, meds: pa.Table, split_map: pa.Table | None, cfg: PrepareConfig
) -> pa.Table:
    """Step 2: join gold codes and medications, assign the split, and give every dropped row its reason."""
    t = pa.table({"hadm_id": texts["hadm_id"], "_row": pa.array(range(texts.num_rows), pa.int64())})
    # Acero joins cannot carry list columns: join row positions, then `take` the lists.
    t = t.join(_positions(labels, "label_pos"), "hadm_id", join_type="left outer")
    t = t.join(_positions(meds, "med_pos"), "hadm_id", join_type="left outer")
    if split_map is not None:
        t = t.join(split_map.rename_columns(["hadm_id", "given_split"]), "hadm_id", join_type="left outer")
    t = t.sort_by("_row")  # joins do not keep order; restore it so output is deterministic
    label_subject = labels["subject_id"].take(t["label_pos"]).to_pylist()
    gold = labels["codes"].take(t["label_pos"]).to_pylist()
    medications = meds["medications"].take(t["med_pos"]).to_pylist()
    given = t["given_split"].to_pylist() if split_map is not None else None
    hadm, subj, note = (texts[c].to_pylist() for c in ("hadm_id", "subject_id", "note"))
    reasons: list[str | None] = []
    splits: list[str | None] = []
    for i in range(texts.num_rows):
        reason, split = None, None
        if hadm[i] is None or subj[i] is None:
            reason = "missing_id"
        elif note[i] is None:
            reason = "empty_note"
        elif not gold[i]:
            reason = "no_icd10_codes"
        elif label_subject[i] != subj[i]:
            reason = "subject_mismatch"
        else:
            split = given[i] if given is not None else split_of(subj[i], cfg)
            if split not in SPLITS:
                reason, split = "not_in_split_file", None
        reasons.append(reason)
        splits.append(split)
    kept = [r is None for r in reasons]
    return pa.table(
        {
            "note_id": texts["note_id"],
            "hadm_id": texts["hadm_id"],
            "subject_id": texts["subject_id"],
            "note": pc.if_else(kept, texts["note"], pa.scalar(None, pa.string())),
            "medications": pa.array(
                [m or [] if k else None for m, k in zip(medications, kept, strict=True)],
                pa.list_(pa.string()),
            ),
            "codes": pa.array(
                [g if k else None for g, k in zip(gold, kept, strict=True)], pa.list_(pa.string())
            ),
            "n_tokens": pc.if_else(kept, texts["n_tokens"], pa.scalar(None, pa.int32())),
            "truncated": pc.if_else(kept, texts["truncated"], pa.scalar(None, pa.bool_())),
            "split": pa.array(splits, pa.string()),
            "drop_reason": pa.array(reasons, pa.string()),
        },
        schema=OUTPUT_SCHEMA,
    )


def prepare_batch(
    batch: pa.Table, labels: pa.Table, meds: pa.Table, split_map: pa.Table | None, cfg: PrepareConfig
) -> pa.Table:
    """Notes (string columns as read) -> prepared rows; dropped rows keep only ids and `drop_reason`."""
    return attach_labels(prepare_texts(batch, cfg), labels, meds, split_map, cfg)


def _positions(table: pa.Table, name: str) -> pa.Table:
    return pa.table({"hadm_id": table["hadm_id"], name: pa.array(range(table.num_rows), pa.int64())})


@dataclass
class PrepareReport:
    notes_in: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> reason -> rows
    seconds: float = 0.0
    keep_discharge_diagnosis: bool = False
    engine: str = "ray"
    label_space: str = "full"  # "full", or "top-50" when prepare.top_k_codes restricted the gold codes

    def format(self) -> str:
        lines = [
            f"prepare ({self.engine}): {self.notes_in} notes in, {sum(self.kept.values())} kept "
            f"({', '.join(f'{k} {v}' for k, v in self.kept.items())}) in {self.seconds:.1f}s; "
            f"discharge diagnosis section {'KEPT' if self.keep_discharge_diagnosis else 'removed'}; "
            f"label space {self.label_space}"
        ]
        for table, reasons in self.dropped.items():
            for reason, n in sorted(reasons.items()):
                lines.append(f"  skipped {n:>7} {table} rows: {reason}")
        return "\n".join(lines)


def load_labels(cfg: PrepareConfig, mimic_root: str) -> tuple[pa.Table, pa.Table | None, dict[str, int]]:
    """Gold codes per admission (+ the optional split file) and the diagnoses rows dropped by reason."""
    labels = mimic.read_diagnoses(mimic_root, mimic.load_codebook(mimic_root))
    split_map = read_split_file(cfg.split_file) if cfg.split_file else None
    return labels.table, split_map, dict(labels.dropped)


def load_medications(mimic_root: str, max_n: int = mimic.MAX_MEDICATIONS) -> tuple[pa.Table, dict[str, int]]:
    meds = mimic.read_medications(mimic_root, max_n)
    return meds.table, dict(meds.dropped)


def read_split_file(path: str) -> pa.Table:
    """hadm_id -> split from CSV or parquet with columns `hadm_id` and `split`."""
    fs, p = storage.resolve(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"split file {path} not found (expected columns hadm_id, split)")
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        t = pq.read_table(p, filesystem=fs, columns=["hadm_id", "split"])
    else:
        import pyarrow.csv as pacsv

        with fs.open_input_stream(p) as f:
            t = pacsv.read_csv(
                f,
                parse_options=mimic.PARSE,
                convert_options=pacsv.ConvertOptions(
                    include_columns=["hadm_id", "split"],
                    column_types={"hadm_id": pa.string(), "split": pa.string()},
                ),
            )
    return pa.table({"hadm_id": mimic.parse_ids(t["hadm_id"]), "split": pc.utf8_lower(t["split"])})


def output_dir(storage_root: str, split: str) -> str:
    return Layout(storage_root).split(split)


def _write_dropped(table: pa.Table, storage_root: str) -> None:
    """Ids and reason of the notes a batch dropped (no note text), for the report and for audit.

    The file name comes from the batch's first row, so a retried task overwrites its own file.
    """
    import pyarrow.parquet as pq

    dropped = table.filter(pc.is_valid(table["drop_reason"])).select(
        ["note_id", "hadm_id", "subject_id", "drop_reason"]
    )
    if dropped.num_rows == 0:
        return
    key = zlib.crc32(repr(table.slice(0, 1).to_pylist()).encode())
    fs, path = storage.resolve(Layout(storage_root).dropped)
    fs.create_dir(path, recursive=True)
    pq.write_table(dropped, f"{path}/part-{key:08x}-{table.num_rows}.parquet", filesystem=fs)


def _kept(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table["drop_reason"])).drop_columns(["drop_reason"])


def _attach_labels_task(
    texts: pa.Table,
    labels: list[Any],
    meds: list[Any],
    split_map: bool,
    cfg: PrepareConfig,
    storage_root: str,
) -> pa.Table:
    import ray

    # Refs nested in fn_kwargs lists arrive unresolved: get them here (zero-copy for Arrow tables). By
    # the time the first notes are cleaned (step 1, fused into the same task) the tables are loaded.
    (labels_t, split_t, _), (meds_t, _) = ray.get([labels[0], meds[0]])
    out = attach_labels(texts, labels_t, meds_t, split_t if split_map else None, cfg)
    _write_dropped(out, storage_root)
    return _kept(out)


def _note_convert_options() -> Any:
    import pyarrow.csv as pacsv

    cols = mimic.NOTE_COLUMNS
    return pacsv.ConvertOptions(
        include_columns=cols, column_types=dict.fromkeys(cols, pa.string()), strings_can_be_null=True
    )


def _reset_outputs(storage_root: str) -> None:
    where = Layout(storage_root)
    for path in (*(where.split(s) for s in SPLITS), where.dropped, where.staging):
        storage.delete_dir(path)
    if storage.exists(where.label_space_file):
        fs, p = storage.resolve(where.label_space_file)
        fs.delete_file(p)


def apply_label_space(k: int, storage_root: str) -> None:
    """Restrict gold codes to the k most frequent codes of the train split (the literature's MIMIC-IV top-50
    setting): `codes` keeps the label-space codes in seq_num order, `all_codes` the full set; admissions
    with no label-space code go to `_dropped` (reason `no_label_space_codes`). The label space is saved in
    `prompts/_label_space.json`; the grammar, the baselines and every metric then use it.
    """
    import pyarrow.parquet as pq

    where = Layout(storage_root)
    counts = Counter(
        c for cs in layout.read_split(storage_root, "train", ["codes"])["codes"].to_pylist() for c in cs
    )
    top = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
    keep = set(top)
    for split in SPLITS:
        if not storage.exists(where.split(split)):
            continue  # a split file may leave a split empty (prepare writes no folder for it)
        t = layout.read_split(storage_root, split)
        full = t["codes"].to_pylist()
        restricted = [[c for c in cs if c in keep] for cs in full]
        has = pa.array([bool(r) for r in restricted])
        t = t.set_column(
            t.schema.get_field_index("codes"), "codes", pa.array(restricted, pa.list_(pa.string()))
        )
        t = t.append_column("all_codes", pa.array(full, pa.list_(pa.string())))
        gone = t.filter(pc.invert(has)).select(["note_id", "hadm_id", "subject_id"])
        if gone.num_rows:
            fs, path = storage.resolve(where.dropped)
            fs.create_dir(path, recursive=True)
            gone = gone.append_column("drop_reason", pa.array(["no_label_space_codes"] * gone.num_rows))
            pq.write_table(gone, f"{path}/label-space-{split}.parquet", filesystem=fs)
        storage.delete_dir(where.split(split))
        fs, path = storage.resolve(where.split(split))
        fs.create_dir(path, recursive=True)
        pq.write_table(t.filter(has), f"{path}/part-0.parquet", filesystem=fs)
    storage.write_json(
        where.label_space_file, {"top_k": k, "codes": top, "train_counts": {c: counts[c] for c in top}}
    )


def add_extra_train(paths: tuple[str, ...], storage_root: str) -> None:
    """Append charts already in the prepared schema (coders' corrections) to the train split."""
    import pyarrow.parquet as pq

    columns = [f.name for f in OUTPUT_SCHEMA if f.name not in ("split", "drop_reason")]
    target = Layout(storage_root).split("train")
    for i, path in enumerate(paths):
        if not storage.exists(path):
            raise FileNotFoundError(
                f"prepare.extra_train: {path} not found (make it with `icdray feedback export`)"
            )
        fs, p = storage.resolve(path)
        extra = pq.read_table(p, filesystem=fs)
        missing = set(columns) - set(extra.column_names)
        if missing:
            raise ValueError(f"prepare.extra_train: {path} lacks columns {sorted(missing)}")
        extra = extra.select(columns).cast(pa.schema([OUTPUT_SCHEMA.field(c) for c in columns]))
        out_fs, out = storage.resolve(target)
        out_fs.create_dir(out, recursive=True)
        pq.write_table(extra, f"{out}/extra-{i}.parquet", filesystem=out_fs)


def _report(
    storage_root: str, engine: str, cfg: PrepareConfig, dropped: dict[str, dict[str, int]], seconds: float
) -> PrepareReport:
    """Apply the label space, then count what was written: every input note is either in a split or in
    `_dropped` with its reason."""
    import pyarrow.dataset as pads

    add_extra_train(cfg.extra_train, storage_root)
    if cfg.top_k_codes:
        apply_label_space(cfg.top_k_codes, storage_root)
    where = Layout(storage_root)
    report = PrepareReport(
        dropped=dropped,
        keep_discharge_diagnosis=cfg.keep_discharge_diagnosis,
        engine=engine,
        seconds=seconds,
        label_space=layout.label_space_name(storage_root),
    )
    for split in SPLITS:
        fs, path = storage.resolve(where.split(split))
        report.kept[split] = (
            pads.dataset(path, filesystem=fs).count_rows() if storage.exists(where.split(split)) else 0
        )
    reasons: Counter = Counter()
    if storage.exists(where.dropped):
        fs, path = storage.resolve(where.dropped)
        reasons.update(
            pads.dataset(path, filesystem=fs).to_table(columns=["drop_reason"])["drop_reason"].to_pylist()
        )
    report.dropped["discharge"] = dict(sorted(reasons.items()))
    report.notes_in = sum(report.kept.values()) + sum(reasons.values())
    storage.write_json(where.prepare_report, report.__dict__)
    return report


def check_inputs(mimic_root: str) -> None:
    """Every MIMIC-IV file prepare reads exists (checked before Ray starts any work)."""
    for rel in (mimic.DISCHARGE, mimic.DIAGNOSES, mimic.D_ICD, mimic.PRESCRIPTIONS):
        if not storage.exists(storage.join(mimic_root, rel)):
            raise FileNotFoundError(
                f"{storage.join(mimic_root, rel)} not found: point --mimic (prepare.mimic) at a MIMIC-IV root "
                "holding hosp/ and note/, or use --mimic demo for synthetic notes"
            )


def run(cfg: PrepareConfig, storage_root: str, mimic_root: str) -> PrepareReport:
    """Ray Data pipeline. Needs Ray initialised (`runtime.ensure_ray`)."""
    import ray

    start = time.time()
    check_inputs(mimic_root)
    _reset_outputs(storage_root)
    # The small per-admission tables load in two tasks while the notes already stream in.
    labels_ref = ray.remote(load_labels).options(num_cpus=0.5).remote(cfg, mimic_root)
    meds_ref = ray.remote(load_medications).options(num_cpus=0.5).remote(mimic_root, cfg.max_medications)
    fs, notes_path = storage.resolve(storage.join(mimic_root, mimic.DISCHARGE))
    # Reading one gzip file is a single streaming task that mostly waits on the map tasks (backpressure):
    # it gets no CPU reservation, so on a 2-core machine both cores go to the note processing.
    ds = ray.data.read_csv(
        notes_path,
        filesystem=fs,
        parse_options=mimic.PARSE,
        convert_options=_note_convert_options(),
        arrow_open_stream_args={"compression": "gzip"},
        num_cpus=0,
    )
    ds = ds.map_batches(
        prepare_texts,
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        num_cpus=cfg.num_cpus,
        fn_kwargs={"cfg": cfg},
    )
    ds = ds.map_batches(  # fused with the step above into one task per batch
        _attach_labels_task,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=cfg.num_cpus,
        fn_kwargs={
            "labels": [labels_ref],
            "meds": [meds_ref],
            "split_map": bool(cfg.split_file),
            "cfg": cfg,
            "storage_root": storage_root,
        },
    )
    staging = Layout(storage_root).staging
    out_fs, staging_path = storage.resolve(staging)
    ds.write_parquet(staging_path, filesystem=out_fs, partition_cols=["split"])
    for split in SPLITS:  # hive folders split=train -> prompts/train
        src = f"{staging_path}/split={split}"
        if out_fs.get_file_info(src).type != 0:
            storage.move_dir(storage.join(staging, f"split={split}"), output_dir(storage_root, split))
    storage.delete_dir(staging)
    (_, _, dx_dropped), (_, rx_dropped) = ray.get([labels_ref, meds_ref])
    return _report(
        storage_root,
        "ray",
        cfg,
        {"diagnoses_icd": dx_dropped, "prescriptions": rx_dropped},
        time.time() - start,
    )


def run_pandas(cfg: PrepareConfig, storage_root: str, mimic_root: str) -> PrepareReport:
    """The same transformation in a single process (pandas/pyarrow, no Ray): the benchmark's reference."""
    import pyarrow.parquet as pq

    start = time.time()
    check_inputs(mimic_root)
    _reset_outputs(storage_root)
    labels, split_map, dx_dropped = load_labels(cfg, mimic_root)
    meds, rx_dropped = load_medications(mimic_root, cfg.max_medications)
    df = mimic.read_csv(mimic_root, mimic.DISCHARGE, mimic.NOTE_COLUMNS).to_pandas()
    parts = []
    for lo in range(0, len(df), cfg.batch_size):
        chunk = pa.Table.from_pandas(df.iloc[lo : lo + cfg.batch_size], preserve_index=False)
        out = prepare_batch(chunk, labels, meds, split_map, cfg)
        _write_dropped(out, storage_root)
        parts.append(_kept(out))
    table = pa.concat_tables(parts)
    for split in SPLITS:
        fs, path = storage.resolve(output_dir(storage_root, split))
        fs.create_dir(path, recursive=True)
        pq.write_table(
            table.filter(pc.equal(table["split"], split)).drop_columns(["split"]),
            f"{path}/part-0.parquet",
            filesystem=fs,
        )
    return _report(
        storage_root,
        "pandas",
        cfg,
        {"diagnoses_icd": dx_dropped, "prescriptions": rx_dropped},
        time.time() - start,
    )
