"""The coders' feedback store: every served chart and every accept / reject / edit / add on its codes.

    Serve  --record_request(request id, note, medications, codes, model)--> requests
    coder  --POST /v1/feedback {request_id, code, action, user[, new_code]}--> feedback (one row per action)
    `icdray feedback export` -> reviewed charts with corrected codes, in the prepared-notes schema
        -> `prepare.extra_train` puts them in the train split: SFT targets (via distill) and GRPO prompts

A real database through SQLAlchemy: SQLite by default, one file under the storage root
(`<root>/feedback/feedback.sqlite`, WAL mode so several Serve replicas write at once), or any
SQLAlchemy URL (`feedback_url`: PostgreSQL for a fleet). Nothing is lost: every action is its own row,
written before the API answers; a restart keeps everything. The note is stored here (the training data
needs it) and nowhere else: never in logs.

A chart is *reviewed* when each of its predicted codes has an action; its corrected codes are the
accepted ones, the edited ones' replacements and the added ones, the principal first (the last
`principal` action, else the model's first code).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

ACTIONS = ("accept", "reject", "edit", "add", "principal")


def default_url(storage_root: str) -> str:
    """SQLite under the storage root (which must then be a local or mounted folder)."""
    from icdray import layout, storage

    if storage.is_uri(storage_root):
        raise ValueError(
            f"the feedback database cannot live on {storage_root} (object storage): set feedback_url to a "
            "database URL (e.g. postgresql://...) or serve with a local --set storage=DIR"
        )
    path = os.path.abspath(layout.Layout(storage_root).feedback_db)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"sqlite:///{path}"


class FeedbackStore:
    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}  # replicas wait for each other's write lock
        self.engine = sa.create_engine(url, future=True, **kwargs)
        if url.startswith("sqlite"):

            @sa.event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

        md = sa.MetaData()
        self.requests = sa.Table(
            "requests",
            md,
            sa.Column("request_id", sa.String(64), primary_key=True),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("model", sa.String(512)),
            sa.Column("note", sa.Text, nullable=False),
            sa.Column("medications", sa.Text),  # JSON list
            sa.Column("age", sa.Integer),
            sa.Column("sex", sa.String(1)),
            sa.Column(
                "codes", sa.Text, nullable=False
            ),  # JSON: [{code, evidence, confidence, role, sequence}]
        )
        self.feedback = sa.Table(
            "feedback",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column(
                "request_id", sa.String(64), sa.ForeignKey("requests.request_id"), nullable=False, index=True
            ),
            sa.Column("code", sa.String(16), nullable=False),
            sa.Column("action", sa.String(16), nullable=False),
            sa.Column("new_code", sa.String(16)),
            sa.Column("user", sa.String(128), nullable=False),
            sa.Column("model_version", sa.String(512)),
            sa.Column("created_at", sa.Float, nullable=False),
        )
        md.create_all(self.engine)

    def record_request(
        self,
        request_id: str,
        note: str,
        medications: Sequence[str],
        codes: Sequence[dict[str, Any]],
        model: str,
        age: int | None = None,
        sex: str | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                self.requests.insert().values(
                    request_id=request_id,
                    created_at=time.time(),
                    model=model,
                    note=note,
                    medications=json.dumps(list(medications)),
                    age=age,
                    sex=sex,
                    codes=json.dumps(list(codes)),
                )
            )

    def record(self, request_id: str, code: str, action: str, user: str, new_code: str | None = None) -> int:
        """One coder action; returns its id. Unknown request ids and actions are errors (ValueError)."""
        from icdray import codes as icd

        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if action == "edit" and not new_code:
            raise ValueError("an edit needs new_code (the code that replaces this one)")
        sa = self.sa
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(self.requests.c.model).where(self.requests.c.request_id == request_id)
            ).first()
            if row is None:
                raise LookupError(f"no coded chart with request_id {request_id!r}")
            result = conn.execute(
                self.feedback.insert().values(
                    request_id=request_id,
                    code=icd.normalize(code),
                    action=action,
                    new_code=icd.normalize(new_code) if new_code else None,
                    user=user,
                    model_version=row.model,
                    created_at=time.time(),
                )
            )
            return int(result.inserted_primary_key[0])

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(self.sa.select(self.sa.func.count()).select_from(self.feedback)).scalar_one()
            )

    def acceptance(self) -> dict[str, int]:
        """Actions by kind (the acceptance rate the Serve metrics report)."""
        sa = self.sa
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(self.feedback.c.action, sa.func.count()).group_by(self.feedback.c.action)
            )
            return {a: int(n) for a, n in rows}

    def reviewed_charts(self) -> list[dict[str, Any]]:
        """Charts whose every predicted code has an action, with their corrected codes (principal first)."""
        sa = self.sa
        with self.engine.connect() as conn:
            reqs = conn.execute(sa.select(self.requests)).mappings().all()
            acts = conn.execute(sa.select(self.feedback).order_by(self.feedback.c.id)).mappings().all()
        by_req: dict[str, list[Any]] = {}
        for a in acts:
            by_req.setdefault(a["request_id"], []).append(a)
        out = []
        for r in reqs:
            actions = by_req.get(r["request_id"], [])
            predicted = [c["code"] for c in json.loads(r["codes"])]
            last = {}
            for a in actions:
                if a["action"] in ("accept", "reject", "edit"):
                    last[a["code"]] = a
            if not predicted or any(c not in last for c in predicted):
                continue
            final = []
            for c in predicted:
                a = last[c]
                if a["action"] == "accept":
                    final.append(c)
                elif a["action"] == "edit":
                    final.append(a["new_code"])
            final += [a["code"] for a in actions if a["action"] == "add"]
            principal = [a["code"] for a in actions if a["action"] == "principal"]
            final = list(dict.fromkeys(final))
            if principal and principal[-1] in final:
                final.remove(principal[-1])
                final.insert(0, principal[-1])
            if final:
                out.append(
                    {
                        **dict(r),
                        "medications": json.loads(r["medications"] or "[]"),
                        "gold": final,
                        "users": sorted({a["user"] for a in actions}),
                    }
                )
        return out


def export(store: FeedbackStore, out_path: str) -> int:
    """Reviewed charts as prepared notes (the prompts/ schema) in one parquet file; returns how many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from icdray import notes, storage

    charts = store.reviewed_charts()
    ids = [int(hashlib.sha256(c["request_id"].encode()).hexdigest()[:15], 16) for c in charts]
    table = pa.table(
        {
            "note_id": pa.array([f"feedback-{c['request_id']}" for c in charts], pa.string()),
            "hadm_id": pa.array(ids, pa.int64()),
            "subject_id": pa.array(ids, pa.int64()),  # one synthetic patient per chart: no patient is split
            "note": pa.array([c["note"] for c in charts], pa.string()),
            "medications": pa.array([c["medications"] for c in charts], pa.list_(pa.string())),
            "codes": pa.array([c["gold"] for c in charts], pa.list_(pa.string())),
            "n_tokens": pa.array([notes.count_tokens(c["note"]) for c in charts], pa.int32()),
            "truncated": pa.array([False] * len(charts), pa.bool_()),
        }
    )
    fs, path = storage.resolve(out_path)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    return table.num_rows
