"""The ``ray`` engine of ``eat.bulk``: the same two steps on Ray Data, streaming, so decoding overlaps the model.

    shards (one block each) -> map_batches(decode_shard)          CPU tasks, retried if their worker dies
                            -> map_batches(ShardRunner)           an actor pool; one onnxruntime session per
                                                                  actor, fractional GPUs allowed
                            -> one summary row per shard          back to the driver, which logs and counts

The runner writes each shard itself (results never travel through the driver) under a fixed name, so
a task Ray retries after a worker died rewrites the same file: retries cannot duplicate rows.
Imported only when ``--engine ray`` is chosen, so the local engine never needs Ray.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from eat.bulk import BulkSpec, OpenPredictor, Shard, ShardRunner, decode_shard
from eat.contract import ModelInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray (or use the one already started in this process)
    num_actors: int = 2
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0  # also the actor's onnxruntime thread count (at least 1)
    decode_cpus: float = 0.5  # per decode task: a logical share, so decoding still runs beside full actors
    max_restarts: int = 3  # a dead actor is restarted this often, its shard retried as often
    max_retries: int = 3  # a decode task whose worker died is retried this often

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ValueError("--num-actors must be at least 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0 or self.decode_cpus <= 0:
            raise ValueError("--gpus-per-actor must be >= 0, --cpus-per-actor and decode_cpus > 0")


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'eat-audio[bulk]'") from None
    return ray


def _decode_batch(batch: dict[str, np.ndarray], *, info: ModelInfo, mode: str, hop_samples: int
                  ) -> dict[str, np.ndarray]:
    (index,), (files,) = batch["index"], batch["files"]
    shard = Shard(int(index), tuple((int(i), str(uri), str(rel)) for i, uri, rel in json.loads(files)))
    return decode_shard(shard, info=info, mode=mode, hop_samples=hop_samples)  # type: ignore[arg-type]


def run_ray(
    shards: list[Shard],
    *,
    spec: BulkSpec,
    out: str,
    open_predictor: OpenPredictor,
    info: ModelInfo,
    hop_samples: int,
    options: RayOptions,
) -> Iterator[dict[str, float | int]]:
    """Yield one summary per committed shard, as the actors finish them (not in shard order)."""
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as err:  # --address names a cluster that is not there
            raise ValueError(f"cannot join the Ray cluster at {options.address}: {err}") from None
    try:
        if not shards:
            return
        cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
        needed = options.num_actors * options.cpus_per_actor + options.decode_cpus
        if needed > cluster_cpus:
            raise ValueError(f"{options.num_actors} actors x {options.cpus_per_actor} CPUs + {options.decode_cpus} for "
                             f"decoding need {needed} CPUs; the Ray cluster has {cluster_cpus:g}. Lower "
                             f"--num-actors or --cpus-per-actor")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows one bar, in clips
        items = [{"index": s.index, "files": json.dumps(s.files)} for s in shards]  # a string: no pickled column
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_decode_batch, batch_size=1, batch_format="numpy", num_cpus=options.decode_cpus,
                            max_retries=options.max_retries,
                            fn_kwargs={"info": info, "mode": spec.mode, "hop_samples": hop_samples})
        threads = max(1, round(options.cpus_per_actor))
        ds = ds.map_batches(
            ShardRunner,
            batch_size=None,  # whole blocks: one block is one shard (checked by ShardRunner)
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.num_actors),
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
            max_restarts=options.max_restarts,
            max_task_retries=options.max_restarts,
            fn_constructor_kwargs={"spec": spec, "out": out, "open_predictor": open_predictor,
                                   "intra_op_threads": threads},
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row in range(len(batch["shard"])):
                yield {k: v[row].item() for k, v in batch.items()}
    finally:
        if started_here:
            ray.shutdown()
