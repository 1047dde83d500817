"""Where a bulk job's audio comes from: local paths (a file, a folder, an EAT ``.tsv`` manifest) or URIs
(``s3://``, ``gs://``, ``hdfs://``, ``file://``; any fsspec protocol where fsspec is installed).

A source is a URI string, not a ``Path``, so that it pickles to a Ray worker unchanged and every worker
opens it the same way. Remote listings go through ``pyarrow.fs`` (which speaks S3, GCS and HDFS
natively) and fall back to fsspec for the protocols pyarrow does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from eat.inputs import AUDIO_SUFFIXES, list_inputs


@dataclass(frozen=True)
class Source:
    uri: str  # a local path, or scheme://...
    rel: str  # its name under the root it was listed from, '/'-separated; unique within a job


def is_uri(source: str) -> bool:
    return "://" in source


def _filesystem(uri: str):  # -> tuple[pyarrow.fs.FileSystem, str]
    try:
        import pyarrow as pa
        import pyarrow.fs as pafs
    except ImportError:
        raise ValueError(f"{uri}: reading URIs needs pyarrow: pip install 'eat-audio[bulk]'") from None
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ImportError) as native_err:
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"{uri}: pyarrow cannot open it ({native_err}) and fsspec is not installed") from None
        protocol = uri.partition("://")[0]
        try:
            fs = fsspec.filesystem(protocol)
        except (ValueError, ImportError) as err:
            raise ValueError(f"{uri}: no filesystem for {protocol}:// ({err})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(uri)


def _list_uri(uri: str) -> list[Source]:
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        return [Source(uri, PurePosixPath(path).name)]
    root = path.rstrip("/")
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(f.path for f in found if f.type == pafs.FileType.File and
                   PurePosixPath(f.path).suffix.lower() in AUDIO_SUFFIXES)
    rels = [PurePosixPath(f).relative_to(root).as_posix() for f in files]
    return [Source(f"{uri.rstrip('/')}/{rel}", rel) for rel in rels]


def list_sources(sources: list[str]) -> list[Source]:
    """Every audio file of every source, in order, each source's files sorted; names must not collide.

    With several sources, each file's ``rel`` is prefixed by the source's position when two sources
    would otherwise give the same name (``0/a.wav``, ``1/a.wav``), so results never overwrite each other.
    """
    per_source: list[list[Source]] = []
    for source in sources:
        if is_uri(source) and not source.startswith("file://"):
            per_source.append(_list_uri(source))
        else:
            local = source.removeprefix("file://")
            per_source.append([Source(str(i.path), i.rel) for i in list_inputs(local)])
    names = [s.rel for group in per_source for s in group]
    if len(names) != len(set(names)):
        per_source = [[Source(s.uri, f"{n}/{s.rel}") for s in group] for n, group in enumerate(per_source)]
    out = [s for group in per_source for s in group]
    seen: dict[str, str] = {}
    for s in out:
        if s.rel in seen:
            raise ValueError(f"{seen[s.rel]} and {s.uri} are both named {s.rel}; list each file once")
        seen[s.rel] = s.uri
    return out


def read_bytes(uri: str) -> bytes:
    """The whole file behind a local path or URI. Raises ``OSError`` if it cannot be read."""
    if not is_uri(uri):
        return Path(uri).read_bytes()
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://")).read_bytes()
    fs, path = _filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
