"""Two-process DDP pre-training with gloo on the CPU: ranks stay in lockstep and only rank 0 writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from training_cases import TINY_MODEL, free_port

from training.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from training.config import PretrainConfig, load_config
from training.data.synthetic import generate
from training.distributed import DistEnv, DistributedError, init_distributed, resolve_device

TINY = [
    *TINY_MODEL,
    "batch_size=2",
    "clone_batch=2",
    "num_workers=0",
    "warmup_steps=1",
    "max_steps=3",
    "log_every=1",
    "save_every=3",
]


def _worker(rank: int, world_size: int, port: int, data_dir: str, out_dir: str, result_dir: str) -> None:
    import os

    from training import pretrain

    torch.set_num_threads(1)  # two processes on two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # read by init_process_group
    env = init_distributed({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}, "cpu")
    assert env.backend == "gloo" and env.is_main == (rank == 0)
    seen: list[int] = []
    original = pretrain.AudioDataset.__getitem__

    def spy(self: object, index: int) -> dict:
        seen.append(index)
        return original(self, index)

    pretrain.AudioDataset.__getitem__ = spy  # type: ignore[method-assign]
    cfg = load_config(PretrainConfig, "demo_pretrain", TINY)
    summary = pretrain.train(cfg, data_dir, out_dir, env)
    torch.save(
        {"model": summary["model"].state_dict(), "teacher": summary["teacher"].state_dict(), "seen": seen},
        Path(result_dir) / f"rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


def test_two_ranks_train_in_lockstep(tmp_path: Path) -> None:
    data_dir = generate(tmp_path / "data", num_train=12, num_eval=1, clip_seconds=1.0, seed=11).data_dir
    out_dir, result_dir = tmp_path / "run", tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(_worker, args=(2, free_port(), str(data_dir), str(out_dir), str(result_dir)), nprocs=2, join=True)

    ranks = [torch.load(result_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["model"].items():  # DDP averaged the gradients: identical weights
        assert torch.equal(value, ranks[1]["model"][key]), key
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), key
    # each rank read its own half of the shuffled epoch: 3 steps × 2 clips, disjoint
    seen = [set(r["seen"]) for r in ranks]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 6 and not seen[0] & seen[1]

    state = load_training_checkpoint(out_dir / CHECKPOINT_NAME, kind="pretrain")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 3
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank RNG streams
    for key, value in state["model"].items():
        assert torch.equal(value, ranks[0]["model"][key]), key
    assert (out_dir / "model.safetensors").is_file()


def test_env_parsing() -> None:
    assert init_distributed({}, "cpu") == DistEnv(device="cpu")
    assert not DistEnv().is_distributed and DistEnv().is_main
    with pytest.raises(DistributedError, match="incomplete"):
        init_distributed({"RANK": "0"}, "cpu")
    with pytest.raises(DistributedError, match="out of range"):
        init_distributed({"RANK": "2", "WORLD_SIZE": "2"}, "cpu")
    with pytest.raises(DistributedError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="CUDA is not available"):
            resolve_device("cuda")
