"""Bulk inference (``eat.bulk``): the local engine against ``Predictor``, the Ray engine against the local
one row for row, resuming after an interrupt without duplicates, a killed worker's shard retried, and bad
files in the errors table. Ray runs in this process's local cluster (``num_cpus=2``); if it cannot start,
these tests fail: they never skip."""

from __future__ import annotations

import sys
from pathlib import Path

import bulk_helpers
import numpy as np
import pandas as pd
import pytest
import ray
from bulk_helpers import FailingOpener, Interrupted, build_toy_model, write_clips

from eat import Predictor
from eat.bulk import BulkSpec, ShardRunner, decode_shard, plan_shards, run_bulk
from eat.bulk_ray import RayOptions
from eat.sources import list_sources
from training.cli import main

NUM_CLIPS = 50
FILES_PER_SHARD = 5  # 11 shards with the corrupt file


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("model") / "toy.onnx")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    write_clips(root, NUM_CLIPS)
    (root / "g1" / "broken.wav").write_bytes(b"RIFF, but not really a wave file")
    return root


@pytest.fixture(scope="module")
def local_cluster():
    ray.cloudpickle.register_pickle_by_value(bulk_helpers)  # Ray's workers cannot import the tests' folder
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def _spec(model: Path, task: str = "embed", **options: object) -> BulkSpec:
    return BulkSpec(model=str(model), task=task, files_per_shard=FILES_PER_SHARD, provider="cpu",  # type: ignore[arg-type]
                    **options)


def _read(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values(["file_id", "window"]).reset_index(drop=True)


def _assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for column in want.columns:
        for a, b in zip(got[column], want[column], strict=True):
            if isinstance(b, np.ndarray):
                np.testing.assert_array_equal(a, b, err_msg=column)
            else:
                assert a == b, column


def _parts(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


# ------------------------------------------------------------------------------------------ local engine


def test_local_embeddings_equal_the_predictor_and_bad_files_are_listed(model, clips, tmp_path) -> None:
    out = tmp_path / "emb.parquet"
    summary = run_bulk(_spec(model, granularity="utterance"), list_sources([str(clips)]), out, progress=False)
    assert (summary.processed, summary.failed, summary.errors_total) == (NUM_CLIPS + 1, 1, 1)
    rows = _read(out)
    assert rows["file_id"].nunique() == NUM_CLIPS and not rows.duplicated(["file_id", "window"]).any()
    errors = pd.read_parquet(out / "_errors")
    assert errors["file_id"].tolist() == ["g1/broken.wav"]
    assert "InvalidAudio" in errors["error"][0] and errors["path"][0] == str(clips / "g1" / "broken.wav")
    predictor = Predictor.from_onnx(model, provider="cpu")
    for file_id, windows in rows.groupby("file_id"):
        clip = predictor.prepare(clips / file_id)
        assert windows["window"].tolist() == list(range(len(clip.windows)))
        np.testing.assert_allclose(windows["start_s"], clip.windows.start_s)
        np.testing.assert_allclose(windows["end_s"], clip.windows.end_s)
        # one window's utterance embedding is that window's CLS vector; their mean is the clip's
        vectors = np.stack(windows["embedding"].tolist())
        whole = predictor.embed(clips / file_id, granularity="utterance").vector
        np.testing.assert_allclose(vectors.mean(axis=0), whole, rtol=1e-5, atol=1e-6)
        assert windows["shape"].map(list).tolist() == [[predictor.info.embedding_dim]] * len(windows)


def test_local_tags_equal_the_predictor_timeline(model, clips, tmp_path) -> None:
    out = tmp_path / "tags.parquet"
    code = main(["predict", str(clips), "--model", str(model), "--out", str(out), "--top-k", "3",
                 "--files-per-shard", str(FILES_PER_SHARD), "--no-progress"])
    assert code == 1  # the broken file
    rows = _read(out)
    predictor = Predictor.from_onnx(model, provider="cpu")
    for file_id, windows in rows.groupby("file_id"):
        timeline = predictor.predict(clips / file_id).timeline(top_k=3)
        assert windows["tag_id"].map(list).tolist() == [[t.id for t in w.tags] for w in timeline]
        np.testing.assert_allclose(np.stack(windows["score"].tolist()),
                                   [[t.score for t in w.tags] for w in timeline], atol=1e-5)


def test_local_resume_after_an_interrupt_writes_no_row_twice(model, clips, tmp_path) -> None:
    sources = list_sources([str(clips)])
    reference = tmp_path / "reference.parquet"
    run_bulk(_spec(model, granularity="frame"), sources, reference, progress=False)
    out = tmp_path / "out.parquet"
    # 5 clips of 1-4 windows per shard, 8 windows per engine call: the 7th call is a few shards in
    with pytest.raises(Interrupted):
        run_bulk(_spec(model, granularity="frame"), sources, out, progress=False,
                 open_predictor=FailingOpener(str(model), fail_at=7))
    committed = _parts(out)
    assert sorted(committed) == [f"part-{i:06d}.parquet" for i in range(len(committed))]  # in order
    assert 0 < len(committed) < len(plan_shards(sources, FILES_PER_SHARD))
    summary = run_bulk(_spec(model, granularity="frame"), sources, out, progress=False)
    assert summary.done_before == len(committed) * FILES_PER_SHARD
    assert summary.processed == len(sources) - len(committed) * FILES_PER_SHARD
    assert {k: v for k, v in _parts(out).items() if k in committed} == committed  # not rewritten
    _assert_same_rows(_read(out), _read(reference))
    again = run_bulk(_spec(model, granularity="frame"), sources, out, progress=False)
    assert again.processed == 0 and again.done_before == len(sources)
    _assert_same_rows(_read(out), _read(reference))


def test_a_folder_of_another_job_is_refused(model, clips, tmp_path) -> None:
    out = tmp_path / "out.parquet"
    sources = list_sources([str(clips)])
    run_bulk(_spec(model, granularity="mean"), sources[:6], out, progress=False)
    with pytest.raises(ValueError, match="different inputs_sha256, num_files"):
        run_bulk(_spec(model, granularity="mean"), sources, out, progress=False)
    with pytest.raises(ValueError, match="different spec"):
        run_bulk(_spec(model, granularity="time"), sources[:6], out, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an `eat` bulk output"):
        run_bulk(_spec(model), sources, tmp_path / "other", progress=False)


def test_uri_sources_through_fsspec(model, clips, tmp_path) -> None:
    import fsspec  # a dependency of ray[data], so the bulk extra has it

    memory = fsspec.filesystem("memory")
    names = ["g0/clip000.wav", "g1/clip001.wav"]
    for name in names:
        memory.pipe(f"/bulk-test/{name}", (clips / name).read_bytes())
    sources = list_sources(["memory://bulk-test"])
    assert [s.rel for s in sources] == names
    assert sources[0].uri == "memory://bulk-test/g0/clip000.wav"
    run_bulk(_spec(model), sources, tmp_path / "uri.parquet", progress=False)
    run_bulk(_spec(model), list_sources([str(clips / n) for n in names]), tmp_path / "local.parquet",
             progress=False)
    got, want = _read(tmp_path / "uri.parquet"), _read(tmp_path / "local.parquet")
    np.testing.assert_array_equal(np.stack(got["embedding"].tolist()), np.stack(want["embedding"].tolist()))


def test_manifests_and_several_sources(clips, tmp_path) -> None:
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{clips}\ng0/clip000.wav\t16000\ng1/clip001.wav\t16000\n")
    assert [(s.uri, s.rel) for s in list_sources([str(manifest)])] == [
        (str(clips / "g0/clip000.wav"), "g0/clip000.wav"), (str(clips / "g1/clip001.wav"), "g1/clip001.wav")]
    # the same file name under two roots: each source's files get its position as a prefix
    both = list_sources([str(clips / "g0"), str(clips / "g0")])
    assert both[0].rel == "0/clip000.wav" and both[len(both) // 2].rel == "1/clip000.wav"


def test_commands_refuse_ray_without_parquet(model, clips, tmp_path, capsys) -> None:
    assert main(["predict", str(clips), "--model", str(model), "--engine", "ray"]) == 2
    assert "--engine ray needs --out" in capsys.readouterr().err
    assert main(["extract", str(clips), str(tmp_path / "npy"), "--model", str(model), "--engine", "ray"]) == 2
    assert "give an OUT ending in .parquet" in capsys.readouterr().err


def test_a_shard_split_across_batches_is_refused(model, clips) -> None:
    spec = _spec(model)
    runner = ShardRunner(spec, "unused", spec.open_predictor)
    shard = plan_shards(list_sources([str(clips)]), FILES_PER_SHARD)[0]
    rows = decode_shard(shard, info=runner.predictor.info, mode="windows", hop_samples=runner.predictor.hop_samples)
    half = {k: v[: len(v) // 2] for k, v in rows.items()}
    with pytest.raises(RuntimeError, match="arrived split"):
        runner.run_shard(half)


# -------------------------------------------------------------------------------------------- Ray engine


def test_ray_equals_local_row_for_row(local_cluster, model, clips, tmp_path) -> None:
    sources = list_sources([str(clips)])
    run_bulk(_spec(model, granularity="frame"), sources, tmp_path / "local.parquet", progress=False)
    summary = run_bulk(_spec(model, granularity="frame"), sources, tmp_path / "ray.parquet", engine="ray",
                       ray_options=RayOptions(num_actors=1), progress=False)
    assert (summary.processed, summary.failed) == (len(sources), 1)
    _assert_same_rows(_read(tmp_path / "ray.parquet"), _read(tmp_path / "local.parquet"))
    assert pd.read_parquet(tmp_path / "ray.parquet" / "_errors")["file_id"].tolist() == ["g1/broken.wav"]


def test_ray_resumes_after_an_interrupt_and_retries_a_killed_worker(local_cluster, model, clips, tmp_path) -> None:
    sources = list_sources([str(clips)])
    spec = _spec(model, task="predict", top_k=4)
    run_bulk(spec, sources, tmp_path / "reference.parquet", progress=False)
    out = tmp_path / "ray.parquet"
    with pytest.raises(Exception, match="stopped at engine call"):
        run_bulk(spec, sources, out, engine="ray", ray_options=RayOptions(num_actors=1), progress=False,
                 open_predictor=FailingOpener(str(model), fail_at=7))
    committed = _parts(out)
    assert 0 < len(committed) < len(plan_shards(sources, FILES_PER_SHARD))
    # the resumed run's only actor dies at its first call; Ray restarts it and retries that shard
    marker = tmp_path / "crashed"
    summary = run_bulk(spec, sources, out, engine="ray", ray_options=RayOptions(num_actors=1), progress=False,
                       open_predictor=FailingOpener(str(model), crash_marker=str(marker)))
    assert marker.exists(), "the worker was meant to die once"
    assert summary.processed + summary.done_before == len(sources)
    assert {k: v for k, v in _parts(out).items() if k in committed} == committed
    _assert_same_rows(_read(out), _read(tmp_path / "reference.parquet"))
    assert len(pd.read_parquet(out / "_errors")) == 1


def test_ray_cli_extract(local_cluster, model, clips, tmp_path, capsys) -> None:
    out = tmp_path / "cli.parquet"
    code = main(["extract", str(clips / "g0"), str(out), "--model", str(model), "--granularity", "mean",
                 "--engine", "ray", "--num-actors", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "clips/s" in printed and "0 failed" in printed and str(out) in printed
    assert _read(out)["file_id"].nunique() == len(list((clips / "g0").glob("*.wav")))


def test_ray_refuses_more_actors_than_cpus(local_cluster, model, clips, tmp_path) -> None:
    with pytest.raises(ValueError, match="the Ray cluster has 2"):
        run_bulk(_spec(model), list_sources([str(clips)]), tmp_path / "x.parquet", engine="ray",
                 ray_options=RayOptions(num_actors=2), progress=False)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
