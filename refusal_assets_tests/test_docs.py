"""The documentation stays true: the README's length, its asset graph, the commands and paths it
names; every config key documented in ``configs/README.md``; the GPU recipes validate offline.

Everything is read at test time (the config models, the graph snapshot, the CLI's parser), so a new
asset, config key or command fails here until the docs say so. After a change of the asset graph
(and of its snapshot), rewrite the README's Mermaid block with:

    python -m refusal_assets_tests.test_docs --write-mermaid
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGS_README = ROOT / "configs" / "README.md"
SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "asset_graph_default.json"
GPU_CONFIGS = ["configs/gemma-2-2b-it.yaml", "configs/llama-3.1-8b-instruct.yaml"]
README_MAX_WORDS = 2000
REGENERATE = "python -m refusal_assets_tests.test_docs --write-mermaid"

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
MERMAID_BLOCK = re.compile(r"^```mermaid\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


# ------------------------------------------------------------------------------ README length
def prose_words(markdown: str) -> int:
    """Words outside fenced code blocks and HTML comments (tables and inline code count)."""
    text = FENCE.sub(" ", markdown)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.DOTALL)
    return len(re.findall(r"\S+", text))


def test_readme_is_short():
    words = prose_words(README.read_text(encoding="utf-8"))
    assert words <= README_MAX_WORDS, (
        f"README.md has {words} words outside code blocks (at most {README_MAX_WORDS}): "
        "move reference detail to the docs beside the code (configs/README.md, "
        "dagster_home/README.md, "
        "data/README.md, refusal_assets/analysis/METHODS.md)"
    )


def test_prose_words_skips_code_blocks():
    assert prose_words("one two\n```bash\nthree four five\n```\nsix <!-- seven -->\n") == 3


# ------------------------------------------------------------------------------ asset graph
def _dimension_names(snapshot: dict) -> dict[tuple[str, ...], str]:
    """Partition keys -> dimension name, learned from the multi-partitioned assets: a single-
    dimension asset whose keys are a known dimension's keys is partitioned by that dimension."""
    names: dict[tuple[str, ...], str] = {}
    for node in snapshot.values():
        for dim, pdef in ((node.get("partitions") or {}).get("multi") or {}).items():
            for keys in pdef.values():
                names.setdefault(tuple(keys), dim)
    return names


def _partition_label(partitions: dict | None, dimension_names: dict[tuple[str, ...], str]) -> str:
    if not partitions:
        return ""
    if "multi" in partitions:
        return " × ".join(partitions["multi"])
    (kind, keys), *_ = partitions.items()
    if isinstance(keys, list):
        return dimension_names.get(tuple(keys), f"{len(keys)} partitions")
    return kind


def _topological(snapshot: dict) -> list[str]:
    """Asset keys, parents before children, ties by name: a stable order for the diagram."""
    done: list[str] = []
    pending = sorted(snapshot)
    while pending:
        ready = [k for k in pending if all(d in done for d in snapshot[k]["deps"] if d in snapshot)]
        if not ready:  # a cycle cannot load in Dagster; keep the rest in name order
            ready = pending
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def mermaid_from_snapshot(snapshot: dict) -> str:
    """The asset graph as a Mermaid flowchart: one box per asset (its partitions under its name),
    one subgraph per Dagster group, one arrow per dependency."""
    dims = _dimension_names(snapshot)
    order = _topological(snapshot)
    groups: dict[str, list[str]] = {}
    for key in order:
        groups.setdefault(snapshot[key].get("group") or "default", []).append(key)
    lines = ["flowchart LR"]
    for group, keys in groups.items():
        lines.append(f'  subgraph group_{re.sub(r"[^A-Za-z0-9_]", "_", group)}["{group}"]')
        for key in keys:
            label = _partition_label(snapshot[key].get("partitions"), dims)
            text = f"{key}<br/>{label}" if label else key
            lines.append(f'    {key}["{text}"]')
        lines.append("  end")
    for key in order:
        for parent in sorted(snapshot[key]["deps"], key=order.index):
            lines.append(f"  {parent} --> {key}")
    return "\n".join(lines) + "\n"


def expected_mermaid() -> str:
    return mermaid_from_snapshot(json.loads(SNAPSHOT.read_text(encoding="utf-8")))


def write_mermaid(readme: Path = README) -> bool:
    """Rewrite the README's ```mermaid block from the snapshot; True when it changed."""
    text = readme.read_text(encoding="utf-8")
    blocks = MERMAID_BLOCK.findall(text)
    if len(blocks) != 1:
        raise SystemExit(f"{readme}: expected exactly one ```mermaid block, found {len(blocks)}")
    new = MERMAID_BLOCK.sub(lambda m: "```mermaid\n" + expected_mermaid() + "```", text, count=1)
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def test_readme_mermaid_matches_graph_snapshot():
    blocks = MERMAID_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1, f"README.md holds {len(blocks)} ```mermaid blocks, not one"
    assert blocks[0] == expected_mermaid(), (
        f"README.md's asset graph differs from {SNAPSHOT.name}; regenerate it with: {REGENERATE}"
    )


def test_mermaid_covers_every_asset_and_dependency():
    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    diagram = mermaid_from_snapshot(snapshot)
    for key, node in snapshot.items():
        assert f'    {key}["{key}' in diagram
        for parent in node["deps"]:
            assert f"  {parent} --> {key}\n" in diagram
    assert "site × category" in diagram or "category × site" in diagram


# ------------------------------------------------------------------------------ commands, paths
def cli_parser() -> argparse.ArgumentParser:
    """The ``refusal-assets`` parser, as ``main`` builds it (captured at ``parse_args``)."""
    from refusal_assets.app import cli

    if callable(getattr(cli, "build_parser", None)):
        return cli.build_parser()

    class Captured(Exception):
        pass

    def capture(self, *args, **kwargs):
        raise Captured(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        cli.main(["--help"])
    except Captured as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("refusal_assets.app.cli.main did not build an argument parser")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _positional_choices(parser: argparse.ArgumentParser) -> set[str]:
    positionals = [a for a in parser._actions if not a.option_strings and a.choices]
    return {str(c) for a in positionals for c in a.choices}


COMMAND = re.compile(r"refusal-assets\s+([a-z][a-z-]*)([^`\n]*)")


def readme_command_problems(markdown: str, parser: argparse.ArgumentParser) -> list[str]:
    """Every ``refusal-assets <command> [--flag ...]`` the text names must exist, with its flags
    (and, for ``bench``, its target in ``bench a|b|c``)."""
    commands = _subcommands(parser)
    problems = []
    for command, rest in COMMAND.findall(markdown):
        if command not in commands:
            known = ", ".join(sorted(commands))
            problems.append(f"refusal-assets {command}: no such command (have: {known})")
            continue
        sub = commands[command]
        rest = rest.split("#")[0]
        for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest):
            if flag not in _options(sub):
                problems.append(f"refusal-assets {command}: no option {flag}")
        targets = _positional_choices(sub)
        if targets:
            named = re.match(r"\s*\[?([a-z|]+)", rest)
            for target in named.group(1).split("|") if named else []:
                if target and target not in targets:
                    problems.append(f"refusal-assets {command} {target}: not {sorted(targets)}")
    return sorted(set(problems))


def test_readme_commands_exist():
    problems = readme_command_problems(README.read_text(encoding="utf-8"), cli_parser())
    assert not problems, "README.md names commands the CLI lacks:\n  " + "\n  ".join(problems)


def test_command_check_catches_a_missing_command_and_flag():
    parser = cli_parser()
    assert readme_command_problems("`refusal-assets validate --config FILE`", parser) == []
    assert readme_command_problems("`refusal-assets frobnicate`", parser)
    assert readme_command_problems("`refusal-assets validate --no-such-flag`", parser)
    assert readme_command_problems("`refusal-assets bench nothing`", parser)


TOP_FOLDERS = r"configs|data|dagster_home|refusal_assets_tests|refusal_assets|\.ci"
REPO_PATH = re.compile(rf"(?<![\w./~-])((?:{TOP_FOLDERS})/[\w./<>*-]*)")
ROOT_FILE_NAMES = r"README\.md|pyproject\.toml|LICENSE|workspace\.yaml"
ROOT_FILES = re.compile(rf"(?<![\w./~-])({ROOT_FILE_NAMES})(?![\w.-])")
LINK_TARGET = re.compile(r"\]\(([^)#\s]+)")


def _relative_links(markdown: str) -> set[str]:
    return {t for t in LINK_TARGET.findall(markdown) if "://" not in t and ":" not in t[:7]}


def readme_path_problems(markdown: str, root: Path = ROOT) -> list[str]:
    """Repository paths the text names (outside ``storage/``, without ``<placeholders>`` or
    globs, not ignored by git) must exist, and so must the targets of relative Markdown links."""
    named = set(REPO_PATH.findall(markdown)) | set(ROOT_FILES.findall(markdown))
    named |= _relative_links(markdown)
    problems = []
    for path in sorted(named):
        path = path.rstrip(".,;:")
        if not path or any(c in path for c in "<>*"):
            continue
        if not (root / path).exists() and not _generated(path, root):
            problems.append(path)
    return problems


def _generated(path: str, root: Path) -> bool:
    """A path git ignores (``data/raw``, ``dagster_home/<config>``): made by a run, not shipped."""
    for candidate in (path, path.rstrip("/") + "/"):  # a folder rule ("/data/raw/") needs the slash
        try:
            args = ["git", "check-ignore", "-q", candidate]
            out = subprocess.run(args, cwd=root, capture_output=True)
        except OSError:
            return False
        if out.returncode == 0:
            return True
    return False


def test_readme_paths_exist():
    problems = readme_path_problems(README.read_text(encoding="utf-8"))
    assert not problems, "README.md names paths that do not exist:\n  " + "\n  ".join(problems)


def test_path_check_catches_a_stale_path():
    assert readme_path_problems("`configs/default.yaml`, [docs](configs/README.md)") == []
    stale = "`refusal-assets run --config configs/orbench.yaml`"
    assert readme_path_problems(stale) == ["configs/orbench.yaml"]
    assert readme_path_problems("see `storage/<config>/sae/<site>`") == []


def test_reference_docs_paths_exist():
    for doc in [
        "configs/README.md",
        "dagster_home/README.md",
        "data/README.md",
        "refusal_assets/analysis/METHODS.md",
    ]:
        text = (ROOT / doc).read_text(encoding="utf-8")
        here = (ROOT / doc).parent
        missing = [t for t in sorted(_relative_links(text)) if not (here / t).exists()]
        missing += readme_path_problems(re.sub(r"\]\([^)]*\)", "]", text))
        assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_dagster_home_readme_is_not_ignored():
    rules = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "/dagster_home/*" in rules and "!/dagster_home/README.md" in rules


# ------------------------------------------------------------------------------ config keys
def _model_classes(annotation) -> list[type[BaseModel]]:
    """Pydantic models inside a field's annotation (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += _model_classes(arg)
    return out


def _is_list(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return origin is list


def config_keys(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every settable key under ``model`` as a dotted path (``models[].generation.max_new_tokens``)
    -> its field info. Set by the loader, not by a config: ``ProjectConfig.root``."""
    keys: dict[str, object] = {}
    for name, field in model.model_fields.items():
        if model.__name__ == "ProjectConfig" and name == "root":
            continue
        path = f"{prefix}{name}"
        keys[path] = field
        for sub in _model_classes(field.annotation):
            nested = f"{path}[]." if _is_list(field.annotation) else f"{path}."
            keys.update(config_keys(sub, nested))
    return keys


CONFIG_MODULES = ["refusal_assets.config", "refusal_assets.features.annotations"]
"""Modules whose pydantic models read a YAML file under ``configs/``."""


def config_models_outside_project() -> list[type[BaseModel]]:
    """Config models that a project config does not reach (e.g. the feature annotations file):
    documented by class name in configs/README.md."""
    import importlib

    from refusal_assets import config

    reached = {config.ProjectConfig}
    for field in config_keys(config.ProjectConfig).values():
        reached.update(_model_classes(field.annotation))
    found = []
    for name in CONFIG_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        found += [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, BaseModel)
            and obj.__module__ == module.__name__
            and not obj.__name__.startswith("_")
            and "[" not in obj.__name__  # pydantic's parametrised generics, e.g. RootModel[dict]
            and obj not in reached
        ]
    return found


def documented_default(field) -> str:
    """How configs/README.md writes a field's default: JSON, ``required`` when there is none."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value, ensure_ascii=False)


TABLE_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*(.*?)\s*\|", re.MULTILINE)


def test_every_config_key_is_documented_with_its_default():
    from refusal_assets.config import ProjectConfig

    text = CONFIGS_README.read_text(encoding="utf-8")
    rows = {key: default for key, default in TABLE_ROW.findall(text)}
    problems = []
    for key, field in config_keys(ProjectConfig).items():
        if key not in rows:
            problems.append(f"`{key}`: no table row")
            continue
        want = documented_default(field)
        got = rows[key].strip("`")
        if got != want:
            problems.append(f"`{key}`: default written as {rows[key]!r}, the model's is `{want}`")
    assert not problems, (
        f"{CONFIGS_README.relative_to(ROOT)} is out of date with refusal_assets/config.py "
        "(rows are `| `dotted.key` | `default` | meaning |`):\n  " + "\n  ".join(problems)
    )


def test_config_models_outside_the_project_config_are_documented():
    text = CONFIGS_README.read_text(encoding="utf-8")
    for model in config_models_outside_project():
        name = model.__name__
        assert f"`{name}`" in text, f"configs/README.md does not describe `{name}`"
        rows = dict(TABLE_ROW.findall(text))
        fields = [f for f in model.model_fields if f != "root"]  # a RootModel is its mapping
        missing = [f for f in fields if f"{name}.{f}" not in rows and f not in rows]
        assert not missing, f"configs/README.md: `{model.__name__}` fields without a row: {missing}"


def test_config_keys_walk_nested_sections_and_lists():
    from refusal_assets.config import ProjectConfig

    keys = config_keys(ProjectConfig)
    assert "models[].generation.max_new_tokens" in keys
    assert "sae.corpus.max_prompts" in keys
    assert "data.sampling.mode" in keys
    assert "root" not in keys


# ------------------------------------------------------------------------------ GPU recipes
@pytest.mark.slow
@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_gpu_recipe_validates_offline(config, tmp_path):
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("REFUSAL_ASSETS_CONFIG", None)
    env.pop("REFUSAL_ASSETS_DATA_DIR", None)
    code = "import sys; from refusal_assets.app.cli import main; sys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", code, "validate", "--config", config],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"validate --config {config}:\n{out.stdout}\n{out.stderr}"
    assert ": OK" in out.stdout


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_gpu_recipe_reads_a_real_pretrained_sae_at_each_site(config):
    """Each site names a SAELens release and SAE that exist, at the site's own layer."""
    from refusal_assets.config import load_config

    directory = pytest.importorskip("sae_lens.loading.pretrained_saes_directory")
    releases = directory.get_pretrained_saes_directory()
    cfg = load_config(ROOT / config)
    for model in cfg.models:
        for site, site_key in zip(model.sites, model.site_keys):
            spec = cfg.sae.pretrained.get(site_key)
            assert spec, f"{config}: site {site_key} has no pretrained SAE (it would be trained)"
            release, _, sae_id = spec.removeprefix("saelens:").partition("/")
            assert release in releases, f"{config}: {spec}: no SAELens release {release!r}"
            assert sae_id in releases[release].saes_map, f"{config}: {spec}: no SAE {sae_id!r}"
            layer = int(re.search(r"\d+", sae_id).group())
            assert site.kind == "resid" and layer == site.layer, f"{config}: {site_key}: {spec}"
        extra = set(cfg.sae.pretrained) - set(model.site_keys)
        assert not extra, f"{config}: pretrained SAEs for no site: {extra}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-mermaid", action="store_true", help="rewrite README's graph")
    args = parser.parse_args(argv)
    if args.write_mermaid:
        changed = write_mermaid()
        print(f"README.md: asset graph {'rewritten' if changed else 'already up to date'}")
        return 0
    print(expected_mermaid(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
