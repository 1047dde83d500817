"""The shared loop scaffold: gradient accumulation (alone and under two-rank DDP) equals one big batch,
the prefetching batch stream resumes exactly, epoch-end validation, and MFU in the log line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from training_cases import TINY_MODEL, free_port

from training import finetune, loop
from training.config import FinetuneConfig, load_config
from training.data.sampler import ResumableSampler, make_loader
from training.data.synthetic import generate
from training.distributed import DistEnv, Reporter, init_distributed

TINY = [
    *TINY_MODEL,
    "num_workers=0",
    "warmup_steps=1",
    "log_every=1",
    "eval_batch_size=8",
]
# Nothing random in a step (no roll, mixup, SpecAugment or drop path) and a loss that is a mean over
# clips (BCE divided by the batch), so any split of one global batch must give the same update.
DETERMINISTIC = [
    *TINY,
    "init=random",
    "roll_aug=false",
    "mixup_alpha=0",
    "mask_ratio=0",
    "model.drop_path_rate=0",
    "loss=bce",
    "bce_normalizer=batch",
    "max_steps=3",
    "eval_every=100",
    "eval_at_epoch_end=false",
    "save_every=100",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("loop-data"), num_train=16, num_eval=2, clip_seconds=1.0, seed=3).data_dir


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, "demo_finetune", [*DETERMINISTIC, *overrides])


def _rank_worker(rank: int, port: int, data_dir: str, out_dir: str, result_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # read by init_process_group
    env = init_distributed({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}, "cpu")
    entered = []
    original = torch.nn.parallel.DistributedDataParallel.no_sync

    def counting_no_sync(self: torch.nn.parallel.DistributedDataParallel):  # type: ignore[no-untyped-def]
        entered.append(1)
        return original(self)

    torch.nn.parallel.DistributedDataParallel.no_sync = counting_no_sync  # type: ignore[method-assign]
    summary = finetune.train(_cfg("batch_size=2", "accum_steps=2"), data_dir, out_dir, env)
    torch.save(
        {"loss": summary["loss"], "model": summary["model"].state_dict(), "no_sync": len(entered)},
        Path(result_dir) / f"rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_accumulating_two_micro_batches_equals_one_batch_twice_as_big(data_dir: Path, tmp_path: Path) -> None:
    big = finetune.train(_cfg("batch_size=8"), data_dir, tmp_path / "big")
    accumulated = finetune.train(_cfg("batch_size=4", "accum_steps=2"), data_dir, tmp_path / "accumulated")
    assert big["step"] == accumulated["step"] == 3
    assert accumulated["loss"] == pytest.approx(big["loss"], abs=1e-5)
    _assert_same_weights(big["model"].state_dict(), accumulated["model"].state_dict())


def test_two_ranks_accumulating_equal_one_process_with_twice_the_batch(data_dir: Path, tmp_path: Path) -> None:
    # 2 ranks × 2 micro-batches × 2 clips = 1 process × 2 micro-batches × 4 clips: the same 8 clips
    # (rank r reads every 2nd clip of the shared order) in every update.
    result_dir = tmp_path / "results"
    result_dir.mkdir()
    args = (free_port(), str(data_dir), str(tmp_path / "ddp"), str(result_dir))
    mp.spawn(_rank_worker, args=args, nprocs=2, join=True)
    ranks = [torch.load(result_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = finetune.train(_cfg("batch_size=4", "accum_steps=2"), data_dir, tmp_path / "single")

    assert ranks[0]["loss"] == pytest.approx(single["loss"], abs=1e-5)  # the mean over both ranks' clips
    _assert_same_weights(single["model"].state_dict(), ranks[0]["model"])
    _assert_same_weights(ranks[0]["model"], ranks[1]["model"])
    assert ranks[0]["no_sync"] == ranks[1]["no_sync"] == 3  # one inner micro-batch per update skips the sync


def test_batches_resume_with_the_batch_that_was_waiting(data_dir: Path) -> None:
    def stream() -> loop.Batches:
        sampler = ResumableSampler(16, seed=1)
        return loop.Batches(make_loader(_Indices(16), 4, sampler, 0, drop_last=True), torch.device("cpu"))

    first = stream()
    seen = [first.next()["waveform"][:, 0].long().tolist() for _ in range(3)]
    first.prefetch()  # batch 4 waits: the sampler has already counted it
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 12
    rest = [first.next()["waveform"][:, 0].long().tolist() for _ in range(3)]
    assert first.epochs_done == 1  # the 4th batch closed epoch 0

    resumed = stream()
    resumed.load_state_dict(state)
    assert [resumed.next()["waveform"][:, 0].long().tolist() for _ in range(3)] == rest
    assert resumed.epochs_done == 1
    everything = [i for batch in [*seen, rest[0]] for i in batch]
    assert sorted(everything) == list(range(16))  # one epoch: every clip exactly once
    with pytest.raises(RuntimeError, match="before the first batch"):
        resumed.load_state_dict(state)


class _Indices(torch.utils.data.Dataset):
    """Items whose one-sample waveform is their index, in the loader's collate format."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"waveform": torch.tensor([float(index)]), "num_samples": 1}


def test_validation_runs_at_epoch_ends_and_every_n_updates(data_dir: Path, tmp_path: Path) -> None:
    # 16 clips / 8 per update: an epoch is 2 updates.
    cfg = _cfg("batch_size=8", "max_steps=7", "eval_every=3", "eval_at_epoch_end=true")
    summary = finetune.train(cfg, data_dir, tmp_path)
    steps = [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6, 7]  # epoch ends 2, 4, 6; every 3: 3, 6; the last update: 7
    assert summary["best"]["step"] in steps
    # With accumulation an epoch can end inside an update: it is validated after that update.
    cfg = _cfg("batch_size=4", "accum_steps=3", "max_steps=3", "eval_every=100", "eval_at_epoch_end=true")
    finetune.train(cfg, data_dir, tmp_path / "accumulated")
    steps = [json.loads(line)["step"] for line in (tmp_path / "accumulated" / "eval.jsonl").read_text().splitlines()]
    assert steps == [2, 3]  # micro-batches 1-4 close epoch 0, inside update 2; 3 is the last update


def test_mfu_is_logged_only_when_the_peak_is_known(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg()
    assert loop.peak_flops(torch.device("cpu"), cfg) is None  # no guessed peak on a CPU
    assert loop.peak_flops(torch.device("cpu"), _cfg("peak_tflops=2.5")) == 2.5e12
    env = DistEnv()
    caplog.set_level(logging.INFO, logger="training.distributed")
    with_peak = Reporter(
        env, tmp_path, total_steps=4, start_step=0, clips_per_step=8, tensorboard=False, desc="t",
        flops_per_step=1e9, peak_flops=1e12,
    )
    logged = with_peak.log(2, {"loss": 1.0})
    achieved = 2 * 1e9 / (2 * 8 / logged["clips_per_s"])  # FLOPs over the same seconds as clips/s
    assert logged["mfu"] == pytest.approx(achieved / 1e12, rel=1e-6)
    assert "mfu" in caplog.text
    without = Reporter(env, tmp_path, total_steps=4, start_step=0, clips_per_step=8, tensorboard=False, desc="t")
    assert "mfu" not in without.log(2, {"loss": 1.0})


def test_flop_counts_follow_the_token_counts() -> None:
    from model.config import tiny
    from model.encoder import flops_per_token
    from training.pretrain import update_flops

    cfg = tiny()
    per_clip = finetune.classifier_flops(cfg, 1, 48)
    assert per_clip == 3 * 49 * flops_per_token(cfg, 49)
    assert finetune.classifier_flops(cfg, 4, 48) == 4 * per_clip
    teacher_only = 49 * flops_per_token(cfg, 49)
    assert update_flops(cfg, 1, 2, 48, 9) == teacher_only + 3 * 2 * 10 * flops_per_token(cfg, 10)
