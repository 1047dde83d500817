"""Bulk inference: embeddings or tags of every clip of an archive, as a resumable, sharded Parquet dataset.

One pipeline, two engines. The inputs (sorted, so every run sees the same order) are cut into shards of
``files_per_shard`` files. A shard goes

    decode + window (``decode_shard``, CPU)  ->  engine + pooling + write (``ShardRunner``)

and is committed by renaming its Parquet file into place. ``local`` runs it in this process (the next
shard is decoded on a thread while the engine works on the current one); ``ray`` (``eat.bulk_ray``)
runs the decode step as Ray Data tasks and ``ShardRunner`` in an actor pool, one onnxruntime session per
actor. Both write the same files, row for row.

Layout of ``OUT`` (a folder; Parquet readers skip names starting with ``_`` or ``.``, so
``pandas.read_parquet(OUT)`` reads exactly the results):

- ``part-000012.parquet``: one row per window of every decoded clip of shard 12;
- ``_errors/part-000012.parquet``: one row per file of shard 12 that could not be read or decoded;
- ``_manifest.json``: the job (settings, shard size, a hash of the input list), so a rerun with other
  inputs or settings is refused instead of mixing two jobs in one folder;
- ``_done.jsonl``: one line per committed shard (files, failures, seconds), appended by the driver.

Resuming: a shard is done when its ``part-*.parquet`` exists; it is written to a temporary name first and
renamed, so a killed run leaves whole shards only and a rerun (or a retried Ray task) rewrites a shard
under the same name: no row is ever written twice. Errors are written before the results they belong to.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from tqdm import tqdm

from eat.audio import AudioError
from eat.contract import GRANULARITIES, Granularity, ModelInfo, Windows, outputs_for, pool, sigmoid
from eat.engine import Provider
from eat.predictor import DEFAULT_TOP_K, MODES, Mode, Predictor, prepare, top_tags
from eat.sources import Source, read_bytes

if TYPE_CHECKING:
    from eat.bulk_ray import RayOptions

logger = logging.getLogger(__name__)

Task = Literal["embed", "predict"]
EngineName = Literal["local", "ray"]
ENGINES: tuple[str, ...] = ("local", "ray")
FORMAT = "eat-bulk/1"
DEFAULT_FILES_PER_SHARD = 64  # ~40 MB of decoded 10 s clips per shard: well under Ray's 128 MiB blocks
NO_WINDOW = -1  # the ``window`` of a decode row that stands for a failed file

# Opens the model in a worker; the argument is onnxruntime's intra-op thread count (0 = all cores).
OpenPredictor = Callable[[int], Predictor]


@dataclass(frozen=True)
class BulkSpec:
    """What to compute; every field but ``provider`` and ``batch_size`` is part of the results' identity."""

    model: str
    task: Task
    granularity: Granularity = "utterance"
    mode: Mode = "windows"
    hop_seconds: float | None = None
    top_k: int = DEFAULT_TOP_K
    files_per_shard: int = DEFAULT_FILES_PER_SHARD
    batch_size: int = 8
    provider: Provider = "auto"

    def __post_init__(self) -> None:
        if self.task not in ("embed", "predict"):
            raise ValueError(f"task must be embed or predict, got {self.task!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        if self.files_per_shard < 1:
            raise ValueError("--files-per-shard must be at least 1")

    def identity(self) -> dict[str, object]:
        """The settings a resumed job must share with the run that started it."""
        return {k: v for k, v in asdict(self).items() if k not in ("provider", "batch_size")}

    def open_predictor(self, intra_op_threads: int = 0, provider: str | None = None) -> Predictor:
        options = {"hop_seconds": self.hop_seconds, "batch_size": self.batch_size}
        if not Path(self.model).exists():
            raise FileNotFoundError(f"model not found: {self.model}")
        if self.model.endswith(".onnx"):
            return Predictor.from_onnx(self.model, provider=provider or self.provider,  # type: ignore[arg-type]
                                       intra_op_threads=intra_op_threads, **options)
        window_seconds = None if self.mode == "original" else 10.0  # as `eat export` would cut it
        return Predictor.from_checkpoint(self.model, window_seconds=window_seconds, **options)


@dataclass(frozen=True)
class Shard:
    index: int
    files: tuple[tuple[int, str, str], ...]  # (file index in the job, uri, rel)


def plan_shards(sources: list[Source], files_per_shard: int) -> list[Shard]:
    return [
        Shard(start // files_per_shard,
              tuple((i, s.uri, s.rel) for i, s in enumerate(sources[start : start + files_per_shard], start)))
        for start in range(0, len(sources), files_per_shard)
    ]


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


# ------------------------------------------------------------------------------------- step 1: decode


def decode_shard(shard: Shard, *, info: ModelInfo, mode: Mode, hop_samples: int) -> dict[str, np.ndarray]:
    """A shard's files -> one row per window (``waveform`` [R, S]), plus one row per failed file.

    A failed file's row has ``window == NO_WINDOW``, zero samples and its reason in ``error``, so that
    the shard's results and errors travel (and are retried) together.
    """
    rows: dict[str, list] = {k: [] for k in ("file_index", "uri", "rel", "window", "start", "num_samples",
                                             "duration_s", "error")}
    waves: list[np.ndarray] = []
    for file_index, uri, rel in shard.files:
        try:
            clip = prepare(read_bytes(uri), info=info, mode=mode, hop_samples=hop_samples, name=rel)
        except (AudioError, OSError) as err:
            parts = ([file_index], [uri], [rel], [NO_WINDOW], [0], [0], [0.0], [f"{type(err).__name__}: {err}"])
            waves.append(np.zeros((1, info.window_samples), np.float32))
        else:
            w = len(clip.windows)
            parts = ([file_index] * w, [uri] * w, [rel] * w, list(range(w)), list(clip.windows.starts),
                     list(clip.windows.num_samples), [clip.audio.duration_s] * w, [""] * w)
            waves.append(clip.windows.waveform)
        for key, values in zip(rows, parts, strict=True):
            rows[key].extend(values)
    num_rows = len(rows["file_index"])
    return {
        "shard": np.full(num_rows, shard.index, np.int64),
        "shard_rows": np.full(num_rows, num_rows, np.int64),  # lets the runner check it got the whole shard
        "file_index": np.asarray(rows["file_index"], np.int64),
        "uri": np.asarray(rows["uri"], object),
        "rel": np.asarray(rows["rel"], object),
        "window": np.asarray(rows["window"], np.int32),
        "start": np.asarray(rows["start"], np.int64),
        "num_samples": np.asarray(rows["num_samples"], np.int64),
        "duration_s": np.asarray(rows["duration_s"], np.float64),
        "error": np.asarray(rows["error"], object),
        "waveform": np.concatenate(waves) if waves else np.zeros((0, info.window_samples), np.float32),
    }


# -------------------------------------------------------------------------- step 2: engine, pool, write


class ShardRunner:
    """Runs the engine on whole shards and commits each one; Ray keeps one per actor (one session each).

    Called with a batch holding one or more complete shards (a Ray block never mixes a shard's rows with
    another block: the decode step returns each shard as one block), it returns one summary row per shard.
    """

    def __init__(self, spec: BulkSpec, out: str, open_predictor: OpenPredictor, intra_op_threads: int = 0) -> None:
        self.spec = spec
        self.out = Path(out)
        self.predictor = open_predictor(intra_op_threads)
        self.outputs = ("logits",) if spec.task == "predict" else outputs_for(spec.granularity)
        if spec.task == "predict" and not self.predictor.info.has_classifier:
            raise ValueError(f"{self.predictor.info.model_name} has no classifier head; use `eat extract`")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [self.run_shard({k: v[batch["shard"] == shard] for k, v in batch.items()})
                     for shard in np.unique(batch["shard"])]
        return {k: np.asarray([s[k] for s in summaries]) for k in summaries[0]}

    def run_shard(self, rows: dict[str, np.ndarray]) -> dict[str, float | int]:
        started = time.perf_counter()
        shard = int(rows["shard"][0])
        if len(rows["shard"]) != int(rows["shard_rows"][0]):
            raise RuntimeError(f"shard {shard} arrived split ({len(rows['shard'])} of {rows['shard_rows'][0]} rows);"
                               f" lower --files-per-shard so a shard fits in one block")
        ok = rows["window"] != NO_WINDOW
        windows = Windows(waveform=rows["waveform"][ok], num_samples=rows["num_samples"][ok],
                          starts=rows["start"][ok])
        outputs = self.predictor.run(windows, self.outputs) if len(windows) else {}
        results = self._results({k: v[ok] for k, v in rows.items()}, outputs)
        errors = {"file_id": rows["rel"][~ok], "path": rows["uri"][~ok], "error": rows["error"][~ok]}
        write_shard(self.out, shard, results, errors)
        return {"shard": shard, "files": len(np.unique(rows["file_index"])), "failed": int((~ok).sum()),
                "windows": int(ok.sum()), "seconds": time.perf_counter() - started}

    def _results(self, rows: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, object]:
        info = self.predictor.info
        columns: dict[str, object] = {
            "file_id": rows["rel"],
            "path": rows["uri"],
            "window": rows["window"],
            "start_s": rows["start"] / info.sample_rate,
            "end_s": (rows["start"] + rows["num_samples"]) / info.sample_rate,
            "duration_s": np.round(rows["duration_s"], 4),
        }
        if self.spec.task == "predict":
            tags = [top_tags(s, info.labels, top_k=self.spec.top_k, threshold=None)
                    for s in sigmoid(outputs.get("logits", np.zeros((0, info.num_classes), np.float32)))]
            columns["tag_index"] = [[t.index for t in row] for row in tags]
            columns["tag_id"] = [[t.id for t in row] for row in tags]
            columns["tag_name"] = [[t.name for t in row] for row in tags]
            columns["score"] = [np.asarray([t.score for t in row], np.float32) for row in tags]
            return columns
        trim = self.spec.mode == "windows"
        vectors = [pool(self.spec.granularity, {k: v[i : i + 1] for k, v in outputs.items()},
                        rows["num_samples"][i : i + 1], info, trim=trim) for i in range(len(rows["window"]))]
        columns["shape"] = [list(v.shape) for v in vectors]
        columns["embedding"] = [v.ravel() for v in vectors]
        return columns


def write_shard(out: Path, shard: int, results: dict[str, object], errors: dict[str, object]) -> None:
    """Errors first, then the results file, whose rename commits the shard (see the module doc)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def atomic_write(table: pa.Table, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    types = {"shape": pa.list_(pa.int32()), "embedding": pa.list_(pa.float32()), "score": pa.list_(pa.float32()),
             "tag_index": pa.list_(pa.int32()), "tag_id": pa.list_(pa.string()), "tag_name": pa.list_(pa.string()),
             "file_id": pa.string(), "path": pa.string(), "error": pa.string(), "window": pa.int32()}
    def table(columns: dict[str, object]) -> pa.Table:
        return pa.table({k: pa.array(list(v), type=types.get(k)) for k, v in columns.items()})

    if len(errors["file_id"]):  # type: ignore[arg-type]
        atomic_write(table(errors), out / "_errors" / part_name(shard))
    atomic_write(table(results), out / part_name(shard))


# ------------------------------------------------------------------------------------------ the job


@dataclass
class BulkSummary:
    out: Path
    files: int = 0  # in the job
    done_before: int = 0  # committed by earlier runs
    processed: int = 0  # by this run
    failed: int = 0  # by this run
    windows: int = 0
    seconds: float = 0.0
    errors_total: int = 0  # rows of the errors table, all runs
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): the last 10 of the table

    @property
    def clips_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def open_job(out: Path, spec: BulkSpec, sources: list[Source]) -> set[int]:
    """Create or check ``OUT/_manifest.json``; the shards already committed."""
    digest = hashlib.sha256("\n".join(f"{s.uri}\t{s.rel}" for s in sources).encode()).hexdigest()
    manifest = {"format": FORMAT, "spec": spec.identity(), "num_files": len(sources), "inputs_sha256": digest}
    path = out / "_manifest.json"
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier != manifest:
            changed = sorted(k for k in manifest if earlier.get(k) != manifest[k])
            raise ValueError(f"{out} holds another job (different {', '.join(changed)}); "
                             f"use another output folder, or delete this one to start over")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not an `eat` bulk output; choose an empty or new folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".manifest.tmp")
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    return {int(p.name[5:11]) for p in out.glob("part-*.parquet")}


def run_local(shards: list[Shard], *, runner: ShardRunner, info: ModelInfo, mode: Mode,
              hop_samples: int) -> Iterator[dict[str, float | int]]:
    """The pipeline in this process: the next shard decodes on a thread while the engine runs this one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eat-decode") as pool_:
        def submit(shard: Shard):
            return pool_.submit(decode_shard, shard, info=info, mode=mode, hop_samples=hop_samples)

        pending = submit(shards[0]) if shards else None
        for i in range(len(shards)):
            batch = pending.result()  # type: ignore[union-attr]
            pending = submit(shards[i + 1]) if i + 1 < len(shards) else None
            yield runner.run_shard(batch)


def run_bulk(
    spec: BulkSpec,
    sources: list[Source],
    out: str | os.PathLike[str],
    *,
    engine: EngineName = "local",
    ray_options: RayOptions | None = None,
    open_predictor: OpenPredictor | None = None,
    progress: bool = True,
) -> BulkSummary:
    """Run (or resume) the job; ``ray_options`` is an ``eat.bulk_ray.RayOptions`` for ``engine="ray"``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    out = Path(out)
    opener: OpenPredictor = open_predictor or spec.open_predictor
    done = open_job(out, spec, sources)
    shards = plan_shards(sources, spec.files_per_shard)
    todo = [s for s in shards if s.index not in done]
    summary = BulkSummary(out=out, files=len(sources),
                          done_before=sum(len(s.files) for s in shards if s.index in done))
    started = time.perf_counter()
    runner: ShardRunner | None = None
    if engine == "local":
        runner = ShardRunner(spec, str(out), opener)
        info, hop = runner.predictor.info, runner.predictor.hop_samples
        results = run_local(todo, runner=runner, info=info, mode=spec.mode, hop_samples=hop)
    else:
        from eat.bulk_ray import RayOptions, run_ray

        options = ray_options or RayOptions()
        if open_predictor is None and options.gpus_per_actor:  # a GPU was asked for: fail loudly without one
            opener = dataclasses.replace(spec, provider="cuda").open_predictor
        # the driver reads the model's geometry on CPU; the actors open their own sessions
        probe = open_predictor(0) if open_predictor else spec.open_predictor(0, provider="cpu")
        info, hop = probe.info, probe.hop_samples
        probe.close()
        results = run_ray(todo, spec=spec, out=str(out), open_predictor=opener, info=info, hop_samples=hop,
                          options=options)
    bar = tqdm(total=len(sources), initial=summary.done_before, unit="clip", desc=f"eat {spec.task} ({engine})",
               disable=not progress, file=sys.stderr, smoothing=0.1)
    with bar, open(out / "_done.jsonl", "a", encoding="utf-8") as log, contextlib.ExitStack() as stack:
        if runner is not None:
            stack.callback(runner.predictor.close)
        for row in results:
            log.write(json.dumps({k: round(float(v), 3) if k == "seconds" else int(v) for k, v in row.items()}) + "\n")
            log.flush()
            summary.processed += int(row["files"])
            summary.failed += int(row["failed"])
            summary.windows += int(row["windows"])
            bar.update(int(row["files"]))
    summary.seconds = time.perf_counter() - started
    _read_errors(summary)
    return summary


def _read_errors(summary: BulkSummary) -> None:
    import pyarrow.parquet as pq

    errors = sorted((summary.out / "_errors").glob("part-*.parquet"))
    summary.errors_total = sum(pq.read_metadata(p).num_rows for p in errors)
    for path in errors[-10:]:
        table = pq.read_table(path, columns=["path", "error"]).to_pylist()
        summary.failures.extend((r["path"], r["error"]) for r in table)
    summary.failures = summary.failures[-10:]


# ----------------------------------------------------------------------------------------- the commands


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("bulk (Parquet output)")
    group.add_argument("--engine", choices=ENGINES, default="local",
                       help="local: this process, with a progress bar (default); ray: Ray Data, decoding on CPU "
                            "tasks and the model in an actor pool")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join ('auto': the one this node belongs to; default: start a local one)")
    group.add_argument("--num-actors", type=int, default=2, help="model actors, one session each (default: 2)")
    group.add_argument("--gpus-per-actor", type=float, default=0.0,
                       help="GPUs per actor; fractions share a GPU (default: 0, CPU)")
    group.add_argument("--cpus-per-actor", type=float, default=1.0,
                       help="CPUs per actor, also its onnxruntime threads (default: 1)")
    group.add_argument("--files-per-shard", type=int, default=DEFAULT_FILES_PER_SHARD,
                       help=f"files per committed Parquet shard, the unit of resuming and retrying "
                            f"(default: {DEFAULT_FILES_PER_SHARD})")


def run_from_args(args: argparse.Namespace, *, task: Task, sources: list[Source], out: str,
                  **spec_options: object) -> int:
    """Shared by ``eat extract --engine`` and ``eat predict --out``: run, print the summary, exit status."""
    from eat.inputs import DEFAULT_MODEL

    if not sources:
        raise ValueError("no audio files in the inputs")
    model = args.model or os.environ.get("EAT_MODEL_PATH") or DEFAULT_MODEL
    spec = BulkSpec(model=str(model), task=task, mode=args.mode, files_per_shard=args.files_per_shard,
                    batch_size=args.batch_size, provider=args.provider, **spec_options)  # type: ignore[arg-type]
    ray_options = None
    if args.engine == "ray":
        from eat.bulk_ray import RayOptions

        ray_options = RayOptions(address=args.address, num_actors=args.num_actors,
                                 gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor)
    summary = run_bulk(spec, sources, out, engine=args.engine, ray_options=ray_options,
                       progress=not args.no_progress)
    print(f"eat {task}: {summary.processed} clips ({summary.windows} windows) in {summary.seconds:.1f} s "
          f"({summary.clips_per_s:.1f} clips/s), {summary.failed} failed, {summary.done_before} already done "
          f"-> {summary.out}")
    if summary.errors_total:
        print(f"  {summary.errors_total} files could not be read: see {summary.out / '_errors'}", file=sys.stderr)
        for path, reason in summary.failures:
            print(f"  failed: {path}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0
