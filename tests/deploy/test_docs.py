"""docs/deploy.md against the code: its commands parse, its YAML is valid, its metric and
variable names are the real ones (both ways: nothing documented that does not exist, nothing
exposed that is not documented)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import ROOT, cli_commands, known_bocompress_env

DOC = ROOT / "docs" / "deploy.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_SUBST = re.compile(r"\$\(([^()]*)\)")
_STOP = {">", ">>", "|", "||", "&&", ";", "&", "2>&1"}


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in _FENCE.findall(DOC.read_text()) if kind == lang]


def _command_lines(script: str) -> list[str]:
    """Lines of a shell block, continuations joined, ``$(...)`` bodies as lines of their own."""
    text = re.sub(r"\\\n\s*", " ", script)
    out: list[str] = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        while (m := _SUBST.search(line)) is not None:
            out.append(m.group(1))
            line = line[:m.start()] + "SUBST" + line[m.end():]
        out.append(line)
    return out


def _bocompress_invocations() -> list[list[str]]:
    commands = {path[0] for path in cli_commands() if path}
    found: list[list[str]] = []
    for block in _blocks("bash"):
        for line in _command_lines(block):
            if not re.search(r"\bbocompress\s", line):
                continue
            words = shlex.split(line)
            for i, w in enumerate(words[:-1]):
                if w == "bocompress" and words[i + 1] in commands:
                    argv = []
                    for a in words[i + 1:]:
                        if a in _STOP:
                            break
                        argv.append(a)
                    found.append(argv)
                    break
    return found


def test_every_documented_bocompress_command_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmds = cli_commands()
    invocations = _bocompress_invocations()
    assert len(invocations) >= 7
    # Arguments that must name an existing file (`submit job.yaml`) get one, in a scratch folder.
    monkeypatch.chdir(tmp_path)
    for argv in invocations:
        if argv[0] == "submit":
            (tmp_path / argv[1]).write_text("name: x\n")
    for argv in invocations:
        path: tuple[str, ...] = (argv[0],)
        if argv[0] == "token":
            path = (argv[0], argv[1])
        cmd = cmds[path]
        cmd.make_context(" ".join(("bocompress", *path)), argv[len(path):])  # raises on a bad option
    assert {"token", "worker", "submit"} <= {a[0] for a in invocations}
    assert ["token", "create", "--role", "worker"] in [a[:4] for a in invocations]


def test_yaml_blocks_parse_and_the_k8s_worker_is_right() -> None:
    docs: list[Any] = []
    for block in _blocks("yaml"):
        docs.extend(d for d in yaml.safe_load_all(block) if d is not None)
    deployment = next(d for d in docs if d.get("kind") == "Deployment")
    secret = next(d for d in docs if d.get("kind") == "Secret")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert isinstance(deployment["spec"]["replicas"], int) and deployment["spec"]["replicas"] >= 1
    env = {e["name"]: e for e in container["env"]}
    ref = env["BOCOMPRESS_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert set(env) <= known_bocompress_env()
    args = container["args"]
    assert args[:2] == ["bocompress", "worker"]
    cli_commands()[("worker",)].make_context("worker", args[2:])
    assert spec["terminationGracePeriodSeconds"] >= 25
    scrape = next(d for d in docs if "scrape_configs" in d)
    assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_slurm_script() -> None:
    script = next(b for b in _blocks("bash") if "#SBATCH" in b)
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --array=0-7" in script
    assert "exec bocompress worker --device cuda" in script


def _exposed_metric_names(tmp_path: Path) -> set[str]:
    """Sample and family names a real service Metrics registry exposes (every series observed once)."""
    from prometheus_client.parser import text_string_to_metric_families

    from bocompress.service.db.migrate import upgrade
    from bocompress.service.db.session import make_engine, make_sessionmaker
    from bocompress.service.metrics import Metrics

    url = f"sqlite:///{tmp_path / 'metrics.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        m = Metrics(make_sessionmaker(engine))
        m.observe_lease(0.01, "w", True)
        m.observe_proposal(0.1, "sobol")
        m.trial_finished("completed")
        m.requests.labels("GET", "/healthz", "200").inc()
        text = m.render().decode()
    finally:
        engine.dispose()
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples if not s.name.endswith("_created"))
    return names


def test_documented_metrics_are_the_exposed_ones(tmp_path: Path) -> None:
    exposed = _exposed_metric_names(tmp_path)
    text = DOC.read_text()
    table = text[text.index("### Metrics"):text.index("### Logs")]
    documented = set(re.findall(r"^\| `(bocompress_[a-z_]+)`", table, re.M))
    assert documented, "no metric table in docs/deploy.md"
    for name in documented:
        assert name in exposed, f"docs/deploy.md lists {name}, which the service does not expose"
    families = {n for n in exposed if not re.search(r"_(bucket|count|sum|created)$", n)}
    counters = {n[:-len("_total")] for n in families if n.endswith("_total")}
    for name in families - counters:
        assert name in documented or f"{name}_total" in documented, f"{name} is exposed but not documented"
    for name in re.findall(r"\b(bocompress_[a-z_]+)", text):
        assert name in exposed, f"docs/deploy.md mentions {name}, which is not a series"


@pytest.mark.parametrize("var", sorted(known_bocompress_env()))
def test_every_variable_is_documented(var: str) -> None:
    assert var in DOC.read_text(), f"{var} is read by the code but not in docs/deploy.md"


def test_documented_variables_exist() -> None:
    known = known_bocompress_env()
    text = DOC.read_text()
    hosts = set(re.findall(r"\b(BOCOMPRESS_[A-Z_]+)\b", text))
    # Compose-side (.env) names used for interpolation, not container variables.
    interpolation_only = {"BOCOMPRESS_WORKER_TOKEN"}
    assert hosts - known <= interpolation_only, f"unknown variables in docs: {sorted(hosts - known)}"
