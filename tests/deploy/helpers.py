"""Readers for the deployment files, and the configuration the code really reads.

Docker is not available where the tests run, so the deployment files are checked against the code
instead: compose interpolation and Dockerfile instructions are parsed here, and the set of
environment variables the code reads is derived from the code itself (the ``Settings`` fields, the
Typer options' ``envvar``, and the ``os.environ``/``os.getenv`` reads in the packages), never from a
hand-written list.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_DIR = ROOT / "docker"
PACKAGES = ("bocompress", "service", "worker")

# ------------------------------------------------------------------------------------ compose

_INTERP = re.compile(r"\$(?:(\$)|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


class MissingVariable(ValueError):
    """A ``${VAR:?message}`` (or ``${VAR?message}``) whose variable is unset (or empty)."""


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Expand a compose string the way ``docker compose`` does.

    Supports ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?err}``, ``${VAR?err}``, ``${VAR:+alt}`` and ``${VAR+alt}``.

    Args:
        value: A string from the compose file.
        env: The variables compose would see (the shell plus ``.env``).

    Returns:
        The expanded string.

    Raises:
        MissingVariable: A required variable is missing; the message is compose's ``err`` text.
        ValueError: A malformed ``${...}``.
    """

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        if m.group("plain"):
            return env.get(m.group("plain"), "")
        b = _BRACED.match(m.group("braced"))
        if b is None:
            raise ValueError(f"invalid interpolation {m.group(0)!r} in {value!r}")
        name, op, arg = b.group("name"), b.group("op"), b.group("arg") or ""
        arg = interpolate(arg, env) if op in (":-", "-", ":+", "+") else arg
        present, nonempty = name in env, bool(env.get(name))
        if op is None:
            return env.get(name, "")
        if op == ":-":
            return env[name] if nonempty else arg
        if op == "-":
            return env[name] if present else arg
        if op == ":?":
            if not nonempty:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return env[name]
        if op == "?":
            if not present:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return env[name]
        if op == ":+":
            return arg if nonempty else ""
        return arg if present else ""  # "+"

    return _INTERP.sub(one, value)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """:func:`interpolate` every string inside a parsed YAML document."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The parsed ``docker-compose.yml``, interpolated with ``env`` when given (raw otherwise)."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc if env is None else interpolate_tree(doc, env)


def environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    """A compose service's ``environment`` as a mapping (list form ``K=V`` / ``K`` accepted)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        out: dict[str, str | None] = {}
        for item in env:
            key, sep, val = str(item).partition("=")
            out[key] = val if sep else None
        return out
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def command_argv(cmd: str | list[str]) -> list[str]:
    """A compose/Dockerfile command as an argument vector (shell form split like ``sh`` would)."""
    import shlex

    return list(cmd) if isinstance(cmd, list) else shlex.split(cmd)


# ------------------------------------------------------------------------------------ Dockerfile


@dataclass
class Instruction:
    """One Dockerfile instruction: its keyword (upper case), raw arguments and line number."""

    keyword: str
    args: str
    line: int


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""

    path: Path
    instructions: list[Instruction] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> "Dockerfile":
        """Parse ``path``: ``\\``-continued lines are joined, ``#`` comment lines skipped."""
        out = cls(path)
        buf, start = "", 0
        for no, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.strip()
            if not buf and (not line or line.startswith("#")):
                continue
            if buf and line.startswith("#"):
                continue  # a comment inside a continued instruction
            if not buf:
                start = no
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            keyword, _, args = buf.partition(" ")
            out.instructions.append(Instruction(keyword.upper(), args.strip(), start))
            buf = ""
        if buf:
            raise ValueError(f"{path}: the file ends inside a continued instruction (line {start})")
        return out

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """Every variable set by ``ENV`` (``K=V ...`` and the legacy ``K V`` form)."""
        import shlex

        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            parts = shlex.split(ins.args)
            if parts and "=" not in parts[0]:
                out[parts[0]] = " ".join(parts[1:])
                continue
            for part in parts:
                key, sep, val = part.partition("=")
                if not sep:
                    raise ValueError(f"{self.path}:{ins.line}: ENV item {part!r} has no '='")
                out[key] = val
        return out

    def exec_form(self, keyword: str) -> list[str] | None:
        """The JSON (exec) form arguments of the last ``CMD``/``ENTRYPOINT``/``HEALTHCHECK CMD``."""
        import json

        ins = self.last(keyword)
        if ins is None:
            return None
        args = ins.args
        if keyword == "HEALTHCHECK":
            args = args[args.index("CMD ") + 4:].strip() if "CMD " in args else args
        return list(json.loads(args)) if args.startswith("[") else command_argv(args)

    def copy_sources(self) -> list[str]:
        """The build-context sources of every ``COPY`` (``--from`` stages excluded)."""
        out: list[str] = []
        for ins in self.all("COPY"):
            parts = [p for p in ins.args.split() if not p.startswith("--")]
            if any(p.startswith("--from") for p in ins.args.split()):
                continue
            out.extend(parts[:-1])
        return out


def dockerfiles() -> dict[str, Dockerfile]:
    """Every ``docker/Dockerfile.*``, by file name."""
    return {p.name: Dockerfile.parse(p) for p in sorted(DOCKER_DIR.glob("Dockerfile.*"))}


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def is_dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Whether ``relpath`` (or a folder above it) matches ``.dockerignore`` (``!`` re-includes)."""
    parts = Path(relpath).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.lstrip("/")
        hit = False
        for cand in candidates:
            if fnmatch.fnmatchcase(cand, pat):
                hit = True
            elif pat.startswith("**/") and (fnmatch.fnmatchcase(cand, pat[3:])
                                            or fnmatch.fnmatchcase(cand.split("/")[-1], pat[3:])):
                hit = True
        if hit:
            ignored = not negate
    return ignored


# ------------------------------------------------------------------------------------ known config


def settings_env_names() -> dict[str, str]:
    """``BOCOMPRESS_<FIELD>`` -> field name, for every field of ``bocompress.service.config.Settings``."""
    from bocompress.service.config import Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper(): name for name in Settings.model_fields}


def cli_commands() -> dict[tuple[str, ...], Any]:
    """Every (sub)command of the ``bocompress`` Typer app as a Click command, by its path."""
    import typer.main

    from bocompress.cli import app

    root = typer.main.get_command(app)
    out: dict[tuple[str, ...], Any] = {}

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        out[path] = cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, (*path, name))

    walk(root, ())
    return out


def cli_envvars() -> dict[str, set[tuple[str, ...]]]:
    """Environment variable -> the CLI commands that read it through an option's ``envvar``."""
    out: dict[str, set[tuple[str, ...]]] = {}
    for path, cmd in cli_commands().items():
        for param in getattr(cmd, "params", []):
            names = param.envvar if isinstance(param.envvar, (list, tuple)) else [param.envvar]
            for name in names:
                if name:
                    out.setdefault(str(name), set()).add(path)
    return out


def _module_constants(tree: ast.Module) -> dict[str, str]:
    consts: dict[str, str] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            for t in targets:
                if isinstance(t, ast.Name):
                    consts[t.id] = value.value
    return consts


def _is_os_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ"
            and isinstance(node.value, ast.Name) and node.value.id == "os")


def _mentions_os_environ(node: ast.expr) -> bool:
    """``os.environ`` itself, or an expression that may evaluate to it (``(env or os.environ)``)."""
    return any(_is_os_environ(n) for n in ast.walk(node) if isinstance(n, ast.expr))


def env_reads_in_code(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Environment variables read by ``os.environ.get/[]/setdefault`` or ``os.getenv`` in the packages.

    Arguments that are string literals or module-level string constants (``ALLOW_IMPORT_ENV =
    "..."``) are resolved.

    Returns:
        Variable name -> the files (relative to the repository) that read it.
    """
    out: dict[str, set[str]] = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            consts = _module_constants(tree)

            def resolve(arg: ast.expr) -> str | None:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    return arg.value
                if isinstance(arg, ast.Name):
                    return consts.get(arg.id)
                return None

            for node in ast.walk(tree):
                name: str | None = None
                if isinstance(node, ast.Call) and node.args:
                    f = node.func
                    if (isinstance(f, ast.Attribute) and f.attr in ("get", "setdefault", "pop")
                            and _mentions_os_environ(f.value)):
                        name = resolve(node.args[0])
                    elif (isinstance(f, ast.Attribute) and f.attr == "getenv"
                          and isinstance(f.value, ast.Name) and f.value.id == "os"):
                        name = resolve(node.args[0])
                elif isinstance(node, ast.Subscript) and _mentions_os_environ(node.value):
                    name = resolve(node.slice)
                if name:
                    out.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return out


def known_bocompress_env() -> set[str]:
    """Every ``BOCOMPRESS_*`` variable the code reads: Settings, CLI options, direct reads."""
    names = set(settings_env_names()) | set(cli_envvars()) | set(env_reads_in_code())
    return {n for n in names if n.startswith("BOCOMPRESS_")}


def iter_bocompress_services(compose: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The compose services that run a bocompress image (built from ``docker/Dockerfile.*``)."""
    for name, svc in (compose.get("services") or {}).items():
        build = svc.get("build")
        dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
        if dockerfile.startswith("docker/Dockerfile.") or str(svc.get("image", "")).startswith("bocompress"):
            yield name, svc
