"""The ``grace`` entry point on tiny data, as a user would run it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from grace.cli import app
from grace.identifiers import IdentifierMap

runner = CliRunner()


def grace(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("set") / "data"
    r = grace("data", "synth", "--n", "40", "--out", out, "--seed", "3")
    assert r.exit_code == 0, r.output
    return out


def test_every_command_has_help():
    for cmd in [
        [],
        ["data"],
        ["ids"],
        ["data", "synth"],
        ["data", "import"],
        ["data", "manifest"],
        ["ids", "assign"],
        ["ids", "extend"],
        ["ids", "remove"],
        ["ids", "show"],
        ["demo"],
    ]:
        r = grace(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output, (cmd, r.output)


def test_manifest_and_summary(tiny_set, tmp_path):
    r = grace("data", "manifest", tiny_set, "--out", tmp_path / "m.parquet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.parquet").exists() and "40" in r.output


@pytest.mark.parametrize("scheme", ["numeric", "string", "semantic", "atomic"])
def test_assign_extend_remove_show(tiny_set, tmp_path, scheme):
    ids = tmp_path / "ids.json"
    r = grace("ids", "assign", "--data", tiny_set, "--scheme", scheme, "--out", ids)
    assert r.exit_code == 0, r.output
    m = IdentifierMap.load(ids)
    assert len(m) == 40
    key = next(iter(m.ids))
    r = grace("ids", "remove", "--ids", ids, key)
    assert r.exit_code == 0, r.output
    m2 = IdentifierMap.load(ids)
    assert key not in m2.ids and key in m2.retired
    # re-extending from the same set adds nothing: the removed image stays retired
    r = grace("ids", "extend", "--ids", ids, "--data", tiny_set)
    assert r.exit_code == 0 and "added 0" in r.output, r.output
    r = grace("ids", "show", ids, "--data", tiny_set, "--json")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.output)
    assert stats["images"] == 39 and stats["trie_nodes"] > 39 and stats["scheme"] == scheme


def test_structured_ids_from_cli(tiny_set, tmp_path):
    ids = tmp_path / "ids.json"
    r = grace(
        "ids",
        "assign",
        "--data",
        tiny_set,
        "--scheme",
        "structured",
        "--out",
        ids,
        "--param",
        "k=3",
        "--param",
        "c=5",
        "--embedder-seconds",
        "3",
    )
    assert r.exit_code == 0, r.output
    m = IdentifierMap.load(ids)
    assert m.params["k"] == 3 and all(len(v[0].split()) >= 2 for v in m.ids.values())


def test_bad_input_is_one_clear_line_and_exit_2(tiny_set, tmp_path):
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "images" / "x.png").write_bytes(b"not an image")
    r = grace("data", "manifest", bad)
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert lines and "x.png" in lines[0] and "rule" in lines[0]
    r = grace("ids", "assign", "--data", tiny_set, "--scheme", "emoji", "--out", tmp_path / "i")
    assert r.exit_code == 2 and "unknown identifier scheme" in r.output
    assert not (tmp_path / "i").exists()
    r = grace("ids", "show", tmp_path / "missing.json")
    assert r.exit_code == 2 and "missing.json" in r.output
