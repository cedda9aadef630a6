"""The image every KFP component runs in: no engine runs here, so the Dockerfile is checked as a
file: what it copies exists and is in the build context, torch comes first from its own index,
and the image runs as a non-root user."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def ignored(path: str) -> bool:
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]  # fmt: skip
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_every_instruction_is_known_and_the_image_runs_as_a_user():
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "ENTRYPOINT", "CMD"}
    steps = instructions()
    assert {word for word, _ in steps} <= known
    users = [arg for word, arg in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_what_it_copies_exists_and_is_in_the_build_context():
    copies = [arg.split()[:-1] for word, arg in instructions() if word == "COPY"]
    sources = [src for srcs in copies for src in srcs if not src.startswith("--")]
    assert {"pyproject.toml", "grace", "components", "pipelines"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src), f"{src} is copied but .dockerignore leaves it out"


def test_the_build_context_leaves_out_venvs_data_and_git():
    for heavy in (".venv", ".git", "data", "work", ".cache", ".dvc/cache", "grace/__pycache__"):
        assert ignored(heavy), heavy


def test_torch_is_installed_first_from_the_variants_index():
    runs = [arg for word, arg in instructions() if word == "RUN" and "pip install" in arg]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    project = next(i for i, r in enumerate(runs) if "'.[" in r)
    assert torch < project and "--index-url ${TORCH_INDEX}" in runs[torch]
    pinned = re.search(r"torch==([\d.]+)", runs[torch]).group(1)
    assert f"torch=={pinned}" in (ROOT / "Makefile").read_text()  # one torch everywhere
