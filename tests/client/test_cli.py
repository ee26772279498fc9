"""The ``bocompress`` command line: help texts, one-line errors, and the client commands
(submit, status, trials) against the stub service of conftest.py."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bocompress.cli import app, expand_specs

runner = CliRunner()

COMMANDS = [[], ["serve"], ["worker"], ["demo"], ["migrate"], ["token"], ["token", "create"],
            ["token", "revoke"], ["submit"], ["status"], ["trials"]]

JOB_YAML = """
name: digits-svd
compression: {model: digits_cnn, data: digits, method: svd}
objective: {kind: scalarized, kappa: 1.0}
budget: {max_trials: 3, max_parallel: 1}
sweep:
  objective.kappa: [0.5, 1, 2]
"""


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_has_an_example(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "bocompress " in result.output.split("Example", 1)[1]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["status", "--bogus"], "No such option: --bogus"),
        (["worker", "--device", "tpu"], "'tpu' is not cpu, cuda or cuda:N"),
        (["token", "create", "--role", "root"], "'root' is not one of"),
        (["trials"], "Missing argument"),
        (["status", "abc"], "job_id"),
        (["serve", "--port", "0"], "--port"),
        (["submit", "no-such-file.yaml"], "does not exist"),
        (["frobnicate"], "No such command"),
    ],
)
def test_wrong_arguments_give_one_line(args: list[str], fragment: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.output


def test_real_process_one_line_error() -> None:
    """The installed entry point behaves the same in a real process (no rich box, no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "bocompress.cli", "worker", "--device", "gpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: Invalid value for '--device'")


def test_cli_does_not_import_heavy_modules() -> None:
    code = "import sys, bocompress.cli; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mods = {m.split(".")[0] for m in out.split()}
    assert not mods & {"torch", "sqlalchemy", "fastapi", "pandas", "matplotlib", "service", "worker"}


def test_missing_component_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bocompress.demo", None)  # as if demo.py were absent
    result = runner.invoke(app, ["demo", "--trials", "2"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot import bocompress.demo")
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_and_worker_pass_their_options(monkeypatch) -> None:
    import types

    calls: dict[str, dict] = {}
    monkeypatch.setitem(sys.modules, "bocompress.service.app", types.SimpleNamespace(serve=lambda **kw: calls.update(serve=kw)))
    monkeypatch.setitem(sys.modules, "bocompress.worker.loop",
                        types.SimpleNamespace(run_worker=lambda **kw: calls.update(worker=kw)))
    monkeypatch.setenv("BOCOMPRESS_DATABASE_URL", "sqlite:///tmp/x.db")
    assert runner.invoke(app, ["serve", "--no-auth", "--port", "9000", "--log-level", "debug"]).exit_code == 0
    assert calls["serve"] == {"host": "127.0.0.1", "port": 9000, "database_url": "sqlite:///tmp/x.db",
                              "auth": False, "log_level": "debug", "processes": 1}
    assert runner.invoke(app, ["serve", "--processes", "3"]).exit_code == 0
    assert calls["serve"]["processes"] == 3
    assert runner.invoke(app, ["serve", "--processes", "0"]).exit_code != 0
    result = runner.invoke(app, ["worker", "--url", "http://h:1", "--device", "cuda:1", "--name", "g1",
                                 "--max-trials", "3", "--poll", "0.5"])
    assert result.exit_code == 0, result.output
    assert calls["worker"] == {"url": "http://h:1", "token": None, "device": "cuda:1", "name": "g1",
                               "max_trials": 3, "poll": 0.5, "allowed_prefixes": None}
    result = runner.invoke(app, ["worker", "--allow-import", "timm, transformers,mypkg.models"])
    assert result.exit_code == 0, result.output
    assert calls["worker"]["allowed_prefixes"] == ["timm", "transformers", "mypkg.models"]
    result = runner.invoke(app, ["worker", "--allow-import", "timm;rm -rf"])
    assert result.exit_code == 2 and "--allow-import" in result.stderr


def test_expand_specs_sweep() -> None:
    import yaml

    specs = expand_specs(yaml.safe_load(JOB_YAML))
    assert [s["objective"]["kappa"] for s in specs] == [0.5, 1, 2]
    assert [s["name"] for s in specs] == [f"digits-svd[objective.kappa={k}]" for k in (0.5, 1, 2)]
    assert all("sweep" not in s for s in specs)
    two = expand_specs({"jobs": [{"name": "a", "sweep": {"budget.max_trials": [5, 6]}}, {"name": "b"}],
                        "sweep": {"optimizer.seed": [0, 1]}})
    assert [(s["name"], s["budget"]["max_trials"], s["optimizer"]["seed"]) for s in two if s["name"].startswith("a")] \
        == [("a[optimizer.seed=0,budget.max_trials=5]", 5, 0), ("a[optimizer.seed=0,budget.max_trials=6]", 6, 0),
            ("a[optimizer.seed=1,budget.max_trials=5]", 5, 1), ("a[optimizer.seed=1,budget.max_trials=6]", 6, 1)]
    assert len(two) == 6


def test_submit_status_trials_against_the_stub(stub, tmp_path) -> None:
    import pandas as pd

    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB_YAML)
    result = runner.invoke(app, ["submit", str(job_file), "--url", stub.url, "--wait", "--poll", "0.01"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[:3] == [f"{i}\tdigits-svd[objective.kappa={k}]" for i, k in zip((1, 2, 3), (0.5, 1, 2))]
    assert all("\tcompleted\tbest objective=" in line for line in lines[3:6])
    assert [j["spec"]["objective"]["kappa"] for j in stub.state.jobs.values()] == [0.5, 1, 2]

    listed = runner.invoke(app, ["status"], env={"BOCOMPRESS_URL": stub.url})
    assert listed.exit_code == 0, listed.output
    rows = listed.stdout.strip().splitlines()
    assert rows[0].split()[:4] == ["id", "name", "state", "kind"] and len(rows) == 4
    assert "completed=3" in rows[1]

    one = runner.invoke(app, ["status", "2", "--url", stub.url])
    assert one.exit_code == 0
    assert "state: completed" in one.stdout and "best: trial" in one.stdout

    csv = runner.invoke(app, ["trials", "2", "--csv", "--url", stub.url])
    assert csv.exit_code == 0, csv.output
    df = pd.read_csv(io.StringIO(csv.stdout))
    assert len(df) == 3 and {"conv1", "fc", "distill_l2", "ratio", "objective"} <= set(df.columns)
    table = runner.invoke(app, ["trials", "2", "--url", stub.url])
    assert table.exit_code == 0 and "distill_l2" in table.stdout.splitlines()[0]


def test_submit_invalid_spec_and_server_errors(stub, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncompression: {model: m, data: d, method: svd}\nbudget: {max_trials: 0}\n")
    result = runner.invoke(app, ["submit", str(bad), "--url", stub.url])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: job 0 (x): budget.max_trials:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert stub.posts("/jobs") == []  # refused before anything was sent

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    result = runner.invoke(app, ["submit", str(broken), "--url", stub.url])
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1

    missing = runner.invoke(app, ["status", "999", "--url", stub.url])
    assert missing.exit_code == 1
    assert missing.stderr.strip() == "error: job 999 not found (HTTP 404, not_found)"

    stub.state.token = "right"
    denied = runner.invoke(app, ["trials", "1", "--url", stub.url, "--token", "wrong"])
    assert denied.exit_code == 1 and "unauthorized" in denied.stderr
