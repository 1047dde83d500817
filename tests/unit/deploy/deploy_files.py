"""Readers for the deployment files (Dockerfile, Compose, Kubernetes YAML) shared by the deploy tests.

No Docker engine or cluster runs in CI, so the tests check these files statically: parse them the way the
tools do (continuation lines, stage inheritance, multi-document YAML, Compose's ``!reset`` tag) and assert
on what they say. ``tests/integration/test_entrypoints.py`` loads this module too, to run the images'
commands outside a container.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]


class DockerfileError(ValueError):
    """The Dockerfile has a shape these readers do not understand (a bug in it or in them)."""


@dataclass
class Stage:
    """One ``FROM ... AS name`` block with the instructions that follow it."""

    name: str
    base: str  # image reference or an earlier stage's name, build args substituted
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, nearest first (what it inherits from)."""
        names = {s.name for s in self.stages}
        out = [self.stage(name)]
        while out[-1].base in names:
            out.append(self.stage(out[-1].base))
        return out

    def effective(self, name: str, keyword: str) -> str | None:
        """The last value of a keyword that carries over between stages (CMD, ENTRYPOINT, USER, ...)."""
        for stage in self.chain(name):
            values = stage.all(keyword)
            if values:
                return values[-1]
        return None

    def env(self, name: str) -> dict[str, str]:
        """ENV of a stage, inherited values first, later ones winning."""
        merged: dict[str, str] = {}
        for stage in reversed(self.chain(name)):
            for args in stage.all("ENV"):
                for item in shlex.split(args):
                    key, sep, value = item.partition("=")
                    if not sep:
                        raise DockerfileError(f"use ENV KEY=VALUE, got {args!r}")
                    merged[key] = value
        return merged

    def exec_form(self, name: str, keyword: str) -> list[str]:
        """CMD/ENTRYPOINT of a stage as an argv list; the shell form is refused (signals would not reach us)."""
        value = self.effective(name, keyword)
        if value is None:
            return []
        try:
            argv = json.loads(value)
        except json.JSONDecodeError as err:
            raise DockerfileError(f"{keyword} of {name} is not in exec (JSON) form: {value!r}") from err
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            raise DockerfileError(f"{keyword} of {name} must be a JSON list of strings: {value!r}")
        return argv

    def command(self, name: str) -> list[str]:
        """What a container of this stage runs: ENTRYPOINT + CMD."""
        return self.exec_form(name, "ENTRYPOINT") + self.exec_form(name, "CMD")


def _logical_lines(text: str) -> list[str]:
    """Join backslash continuations and drop comments, like the Dockerfile parser (default escape ``\\``)."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comments, also inside a continued instruction, and parser directives
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = _substitute(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=base))
        elif not stages:
            if keyword != "ARG":
                raise DockerfileError(f"only ARG may come before the first FROM, got {keyword}")
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    if not stages:
        raise DockerfileError(f"{path} has no FROM")
    return Dockerfile(global_args=global_args, stages=stages)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """All non-empty documents of a (multi-document) YAML file."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


class Reset:
    """Compose's ``!reset`` tag: in an override file, removes the value it is set on."""

    def __repr__(self) -> str:
        return "Reset()"


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's merge tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def load_compose(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.load(f, Loader=ComposeLoader)


def strip_resets(value: Any) -> Any:
    """A file's content without its ``!reset`` entries (what it says on its own)."""
    if isinstance(value, dict):
        return {k: strip_resets(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_resets(v) for v in value if not isinstance(v, Reset)]
    return value


def merge_compose(base: Any, override: Any) -> Any:
    """``docker compose -f base -f override`` for the keys these files use: mappings merge, ``!reset``
    removes, other values (scalars and sequences such as ``command``) are replaced by the override's."""
    if isinstance(override, Reset):
        return Reset()
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge_compose(base.get(key), value)
            if isinstance(result, Reset):
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    return override


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether ``path`` (relative, '/'-separated) is left out of the build context: the last pattern that
    matches the path or one of its parent folders decides, ``!`` patterns re-include."""
    import fnmatch

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negate
    return excluded


def read_dockerignore(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


# ---- PromQL in the dashboard and the alert rules ----------------------------------------------------------
# Labels Prometheus attaches to every scraped series (not exported by the service itself).
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod", "service", "container"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of a Grafana dashboard JSON (rows' nested panels included)."""

    def walk(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
        out = []
        for panel in panels:
            out += [(panel.get("title", ""), t["expr"]) for t in panel.get("targets", []) if t.get("expr")]
            out += walk(panel.get("panels", []))
        return out

    return walk(json.loads(path.read_text())["panels"])


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values Prometheus accepts, so the query can be parsed as PromQL."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """The service's metrics (prefix ``eat_``) that a PromQL expression reads."""
    return set(re.findall(r"\beat_[a-z0-9_]+\b", _STRING.sub('""', expr)))


def label_names(expr: str) -> set[str]:
    """Labels an expression groups by or matches on: ``by/on/without/ignoring (...)`` and ``{name=...}``."""
    bare = _STRING.sub('""', expr)
    names: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", bare):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", bare):
        names |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    return names


def promql_problems(expr: str) -> list[str]:
    """Mistakes a Python reading can catch without promtool: unbalanced brackets, rate() without a range,
    histogram_quantile() whose aggregation drops ``le`` or reads something other than ``_bucket``."""
    problems = []
    bare = _STRING.sub('""', expr)
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in bare:
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            problems.append(f"unbalanced {char!r}")
    if stack:
        problems.append(f"unclosed {stack!r}")
    for fn in ("rate", "irate", "increase", "avg_over_time", "max_over_time"):
        for match in re.finditer(rf"\b{fn}\s*\(", bare):
            depth, i = 1, match.end()
            while depth and i < len(bare):
                depth += {"(": 1, ")": -1}.get(bare[i], 0)
                i += 1
            if "[" not in bare[match.end(): i]:
                problems.append(f"{fn}() needs a range vector: {bare[match.start(): i]}")
    for match in re.finditer(r"\bhistogram_quantile\s*\(", bare):
        depth, i = 1, match.end()
        while depth and i < len(bare):
            depth += {"(": 1, ")": -1}.get(bare[i], 0)
            i += 1
        inner = bare[match.end(): i]
        if not re.search(r"\w+_bucket\b", inner):
            problems.append(f"histogram_quantile() without a _bucket series: {inner}")
        by = re.search(r"\bby\s*\(([^)]*)\)", inner)
        if by and "le" not in {n.strip() for n in by.group(1).split(",")}:
            problems.append(f"histogram_quantile() aggregation drops le: {inner}")
    return problems
