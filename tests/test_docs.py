"""Docs: the configuration reference is current (and goes stale when a config field is added), the runnable examples
run, the worked component example works as written, links resolve, and the Dockerfile installs exactly the pinned
requirements and the package."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from medm.config import arg

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
RUNNABLE = re.compile(r"<!-- runnable -->\n```(?:bash|sh)\n(.*?)```", re.S)
EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```\w*\n(.*?)```", re.S)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def test_config_reference_is_current():
    current = (REPO / "docs" / "config_reference.md").read_text()
    assert GEN.render() == current, f"docs/config_reference.md is out of date: run {GEN.COMMAND}"


@pytest.mark.parametrize("where", list(GEN.CONFIG_CLASSES))
def test_config_reference_goes_stale_when_a_field_is_added(where, monkeypatch):
    module_name, class_name = GEN.CONFIG_CLASSES[where]
    module = importlib.import_module(module_name)
    base = getattr(module, class_name)
    grown = dataclasses.make_dataclass(class_name, [("zz_new_knob", int, arg(3, "a knob added without regenerating"))],
                                       bases=(base,))
    monkeypatch.setattr(module, class_name, grown)
    text = GEN.render()
    assert "| `zz_new_knob` | `int` | `3` | a knob added without regenerating |" in text
    assert text != (REPO / "docs" / "config_reference.md").read_text()


@pytest.mark.parametrize("where", list(GEN.CONFIG_CLASSES))
def test_every_config_key_has_a_description(where):
    cls = GEN._cls(where)
    from_doc = GEN.docstring_args(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not (f.metadata.get("help") or from_doc.get(f.name))]
    assert not missing, f"{cls.__qualname__}: give these fields a help text (medm.config.arg): {missing}"


def test_docstring_args_reads_google_style_sections():
    def f(a, b, c):
        """Summary.

        Args:
            a, b: shared text
                on two lines.
            c: own text.

        Returns:
            nothing: not an argument.
        """

    assert GEN.docstring_args(f) == {"a": "shared text on two lines.", "b": "shared text on two lines.",
                                     "c": "own text."}


def _runnable_blocks():
    for path in [REPO / "README.md", *DOCS]:
        text = path.read_text()
        for m in RUNNABLE.finditer(text):
            line = text[:m.start()].count("\n") + 2
            yield pytest.param(m.group(1), id=f"{path.name}:{line}")


def test_some_examples_are_marked_runnable():
    assert len(list(_runnable_blocks())) >= 2


@pytest.mark.parametrize("script", list(_runnable_blocks()))
def test_runnable_doc_examples_run(script, tmp_path):
    """Each block marked `<!-- runnable -->` runs as written (bash, fail on the first error) in a fresh directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def test_the_component_walkthrough_works_as_written(monkeypatch):
    """docs/adding_a_component.md: its encoder file registers, its YAML validates and builds as a tiny twin, and its
    tests pass. The registration goes into a copy of the registry, so nothing leaks into other tests."""
    from medm.models import build_model, parse_model_args
    from medm.models import tiny as tiny_module
    from medm.registry import VISION

    blocks = dict(EXAMPLE.findall((REPO / "docs" / "adding_a_component.md").read_text()))
    assert set(blocks) == {"encoder", "model-yaml", "tiny", "test"}
    VISION.names()  # load the shipped components first
    monkeypatch.setattr(VISION, "_items", dict(VISION._items))
    monkeypatch.setattr(tiny_module, "TINY_VISION", {**tiny_module.TINY_VISION, **eval("{" + blocks["tiny"] + "}")})
    exec(compile(blocks["encoder"], "dinov2.py", "exec"), types.ModuleType("dinov2").__dict__)
    assert "dinov2" in VISION.names()
    cfg = yaml.safe_load(blocks["model-yaml"])
    parse_model_args(cfg, "dinov2-qwen2.5-0.5b.yaml")  # the real config validates as written
    model, _ = build_model(tiny_module.tiny_overrides(cfg))
    assert model.config.vision["name"] == "dinov2" and model.num_image_tokens == 4  # 4x4 grid pooled by 2
    namespace: dict = {}
    exec(compile(blocks["test"], "test_vision_dinov2.py", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def test_links_between_docs_resolve():
    """Every relative link of the README and docs/ names a file that exists, and an anchor that file has."""
    broken = []
    for path in [REPO / "README.md", *DOCS]:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken


def test_readme_links_every_doc():
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in DOCS if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"add these to the README's Documentation section: {unlinked}"


def test_dockerfile_installs_exactly_the_pinned_requirements_and_the_package():
    """The image's environment is requirements.txt as tested plus medm (no deps), the GPU extras pinned, and build
    tooling; nothing from requirements.txt is installed a second way."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    steps = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    assert re.search(r"^COPY requirements\.txt \.$", steps, re.M)
    assert steps.index("COPY requirements.txt") < steps.index("COPY . .")  # the pinned layer does not depend on code
    runs = [line[4:] for line in steps.splitlines() if line.startswith("RUN ")]
    installs = [cmd.strip() for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    assert "DS_BUILD_OPS=0 pip install -r requirements.txt" in installs
    assert "pip install --no-deps -e ." in installs
    assert not any(".[gpu]" in cmd for cmd in installs)  # extras pinned, not resolved afresh
    named = []
    for cmd in installs:
        if cmd in ("DS_BUILD_OPS=0 pip install -r requirements.txt", "pip install --no-deps -e ."):
            continue
        args = cmd.split("pip install", 1)[1].split()
        named += [a for a in args if not a.startswith("-")]
    versions = {a.split("==")[0].lower(): a.split("==")[1] for a in named if "==" in a}
    tools = {a.lower() for a in named if "==" not in a}
    assert set(versions) == {"flash-attn", "bitsandbytes"}, named
    assert tools <= {"pip", "wheel"}, tools
    pinned = {re.split(r"[=<>\[ ]", line)[0].lower() for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert not (set(versions) | tools) & pinned
    for name, arg_name in (("flash-attn", "FLASH_ATTN_VERSION"), ("bitsandbytes", "BITSANDBYTES_VERSION")):
        assert versions[name] == f"${{{arg_name}}}" and re.search(rf"^ARG {arg_name}=\d", text, re.M), name
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-\S*devel", base), base  # nvcc, for flash-attn
