"""Docs: the configuration reference is current (and goes stale when a config field is added), every shell block of
README.md and docs/*.md is run here or marked with what it needs (and the runnable ones run), the worked component
example works as written, links resolve, and the Dockerfile installs exactly the pinned requirements and the
package."""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medm.config import arg

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
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


# ---- shell blocks: run by the test, or marked with what they need ------------------------------------------------
# Every fenced block names its language. A shell block (bash / sh / shell / console) has a marker comment on the line
# before its opening fence:
#   <!-- runnable -->                         runs as written (the page's runnable blocks in order, one fresh folder)
#   <!-- runnable: "OLD" -> "NEW", ... -->    runs with these stated substitutions (each OLD must be in the block)
#   <!-- runnable after `SETUP` -->           runs after the setup command (e.g. one that writes the example files)
#   <!-- synopsis -->                         placeholders (NAME, DIR, [--option]): `medm SUBCOMMAND --help` runs
#   <!-- needs KIND[, KIND]: reason -->       not run here; KIND is one of NEEDS
SHELL_LANGS = ("bash", "sh", "shell", "console")
NEEDS = {"weights": "a trained model or pretrained hub weights", "data": "a dataset release that is not shipped",
         "gpu": "one or more GPUs", "network": "downloads (PyPI, git, docker) or other machines",
         "server": "a server that runs until stopped", "minutes": "minutes of CPU time"}
MARKER = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")
SUBSTITUTION = re.compile(r'"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, dedented by its fence's indent, with the marker comment above."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2).strip()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        marker = MARKER.match(lines[i - 1]) if i else None
        blocks.append(Block(path.name, i + 1, lang, "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n",
                            marker.group(1) if marker else None))
        i = end + 1
    return blocks


def _doc_blocks() -> list[Block]:
    return [b for path in [REPO / "README.md", *DOCS] for b in _fenced_blocks(path)]


def _shell_blocks() -> list[Block]:
    return [b for b in _doc_blocks() if b.lang in SHELL_LANGS]


def _marker_problem(block: Block) -> str | None:
    """Why a shell block's marker is missing or malformed; None when it is fine."""
    marker = block.marker
    if marker is None:
        return "no marker: make the test run it (<!-- runnable -->) or say what it needs (<!-- needs KIND: why -->)"
    if marker == "synopsis":
        return None
    if marker.startswith("runnable"):
        rest = marker[len("runnable"):]
        for old, _ in SUBSTITUTION.findall(rest):
            if old not in block.text:
                return f"substitution {old!r} does not occur in the block"
        rest = re.sub(r"^\s*after\s+`[^`]+`", "", SUBSTITUTION.sub("", rest.lstrip(": ")))
        return None if not rest.strip(" ,:") else f"cannot read {marker!r}"
    m = re.fullmatch(r"needs ([\w, ]+):\s*(\S.*)", marker)
    if not m:
        return f"cannot read {marker!r}; write <!-- needs KIND[, KIND]: why -->"
    unknown = [k for k in re.split(r"[,\s]+", m.group(1).strip()) if k not in NEEDS]
    return f"unknown kinds {unknown}; kinds: {', '.join(NEEDS)}" if unknown else None


def _runnable_script(block: Block) -> str:
    """The block as the test runs it: setup first, then the text with the stated substitutions."""
    rest = block.marker[len("runnable"):]
    text = block.text
    for old, new in SUBSTITUTION.findall(rest):
        text = text.replace(old, new)
    setup = re.search(r"after\s+`([^`]+)`", rest)
    return (setup.group(1) + "\n" if setup else "") + text


def test_every_fenced_block_names_its_language():
    bare = [b.id for b in _doc_blocks() if not b.lang]
    assert not bare, f"give these blocks a language (bash, text, json, ...) so shell blocks can be found: {bare}"


def test_every_shell_command_is_run_or_marked():
    """A shell block the test does not run says what it needs (weights, data, a GPU, ...); unmarked ones fail."""
    blocks = _shell_blocks()
    assert len(blocks) > 40  # every page's blocks are found (README and docs/*.md)
    problems = [f"{b.id}: {p}\n    {b.text.splitlines()[0]}" for b in blocks if (p := _marker_problem(b))]
    assert not problems, "\n".join(problems)


def test_a_block_without_a_marker_or_with_a_bad_one_is_reported():
    def block(marker):
        return Block("x.md", 1, "bash", "medm data build phantoms --out d --n-train 4000\n", marker)

    assert "no marker" in _marker_problem(block(None))
    assert "unknown kinds ['cloud']" in _marker_problem(block("needs cloud: why"))
    assert "cannot read" in _marker_problem(block("needs gpu"))  # no reason given
    assert "does not occur" in _marker_problem(block('runnable: "--n-train 9" -> "--n-train 2"'))
    assert _marker_problem(block('runnable: "--n-train 4000" -> "--n-train 8"')) is None
    assert _marker_problem(block("runnable after `medm list`")) is None
    assert _runnable_script(block('runnable after `medm list`: "4000" -> "8"')) == (
        "medm list\nmedm data build phantoms --out d --n-train 8\n")


def test_runnable_and_synopsis_blocks_run(tmp_path):
    """Each `runnable` block runs (with its setup and substitutions) and each synopsis's commands exist, all in one
    process (tests/docs_runner.py): `medm ...` commands through medm.cli.main, others through bash."""
    blocks = [b for b in _shell_blocks() if b.marker and (b.marker == "synopsis" or b.marker.startswith("runnable"))]
    assert sum(b.marker.startswith("runnable") for b in blocks) >= 6 and sum(b.marker == "synopsis" for b in blocks)
    jobs = [{"id": b.id, "page": b.page, "mode": "synopsis" if b.marker == "synopsis" else "run",
             "script": b.text if b.marker == "synopsis" else _runnable_script(b)} for b in blocks]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    root = tmp_path / "run"
    root.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "docs_runner.py"), str(tmp_path / "jobs.json"),
                           str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    assert [r["id"] for r in results] == [j["id"] for j in jobs]
    failed = [f"--- {r['id']}\n{r['log']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)


def _walk_through_adding_a_component(monkeypatch, tmp_path):
    """docs/adding_a_component.md: its DINOv2 YAML (no Python) validates and builds as a tiny twin; its connector file,
    dropped into a plugin folder with no import line anywhere, registers at the next first lookup; its tests pass.
    The folder is a fresh package added to the registry's plugin folders, and the registration goes into a copy of
    the registry without the example's name (a reader who followed the page ships `pixel_shuffle` already), so
    nothing leaks into other tests and nothing collides."""
    import uuid

    from medm import registry
    from medm.models import build_model, parse_model_args
    from medm.models.tiny import tiny_overrides
    from medm.registry import CONNECTOR

    blocks = dict(EXAMPLE.findall((REPO / "docs" / "adding_a_component.md").read_text()))
    assert set(blocks) == {"model-yaml", "connector", "test"}
    # The encoder: one YAML through `hf`.
    cfg = yaml.safe_load(blocks["model-yaml"])
    assert cfg["vision"]["name"] == "hf" and cfg["vision"]["model_type"] == "dinov2"
    parse_model_args(cfg, "dinov2-qwen2.5-0.5b.yaml")  # the real config validates as written
    model, _ = build_model(tiny_overrides(cfg))
    assert type(model.vision.model).__name__ == "Dinov2Model" and model.num_image_tokens == 4  # 4x4 grid pooled by 2
    # select_layer -1: every block reaches the features; the final norm and the pretraining mask token do not
    assert model.vision.unused_parameter_names() == ["model.embeddings.mask_token", "model.layernorm.weight",
                                                     "model.layernorm.bias"]
    # The connector: one file in a plugin folder, found at the first lookup.
    CONNECTOR.names()  # load the shipped components first
    package = f"walkthrough_{uuid.uuid4().hex}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "pixel_shuffle.py").write_text(blocks["connector"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(CONNECTOR, "_items", {k: v for k, v in CONNECTOR._items.items() if k != "pixel_shuffle"})
    monkeypatch.setattr(registry, "PLUGIN_FOLDERS", (*registry.PLUGIN_FOLDERS, package))
    monkeypatch.setattr(registry, "_loaded", False)
    assert "pixel_shuffle" in CONNECTOR.names()
    assert CONNECTOR.get("pixel_shuffle").__module__ == f"{package}.pixel_shuffle"
    namespace: dict = {}
    exec(compile(blocks["test"], "test_walkthrough.py", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()


def test_the_component_walkthrough_works_as_written(monkeypatch, tmp_path):
    _walk_through_adding_a_component(monkeypatch, tmp_path)


def test_the_component_walkthrough_still_works_once_followed(monkeypatch, tmp_path):
    """After a reader added medm/models/connectors/pixel_shuffle.py, the docs test must not fail with 'already
    registered'."""
    from medm.registry import CONNECTOR

    CONNECTOR.names()

    class Shipped:  # what the reader's own pixel_shuffle.py registered
        pass

    monkeypatch.setattr(CONNECTOR, "_items", {**CONNECTOR._items, "pixel_shuffle": Shipped})
    _walk_through_adding_a_component(monkeypatch, tmp_path)
    assert CONNECTOR._items["pixel_shuffle"] is not Shipped  # the page's class was the one tested


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


def test_the_docs_runner_fails_a_failing_command_and_reads_blocks(tmp_path):
    """tests/docs_runner.py: a `medm` usage error or a failing shell command is a non-zero status; continuation lines
    join; a synopsis keeps the words before its first placeholder."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import docs_runner
    finally:
        sys.path.remove(str(REPO / "tests"))
    cwd = os.getcwd()
    try:
        rc, out = docs_runner.run_command("medm list --no-such-option", tmp_path)
        assert rc == 2 and "unrecognized arguments" in out
        assert docs_runner.run_command("test -e no-such-file", tmp_path)[0] == 1
    finally:
        os.chdir(cwd)
    assert docs_runner.commands("# c\nmedm a \\\n    b=1   # x\n\nmedm c\n") == ["medm a  b=1   # x", "medm c"]
    assert docs_runner.commands("medm a [--x]\n      [--y]\n", synopsis=True) == ["medm a [--x] [--y]"]
    assert docs_runner.synopsis_prefix("medm data build NAME --out DIR [--x]") == ["medm", "data", "build"]
