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
        ["train"],
        ["retrieve"],
        ["describe"],
        ["evaluate"],
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


# ---------------------------------------------------------------------------------------------
# grace train | retrieve | describe | evaluate
# ---------------------------------------------------------------------------------------------
SMALL_RUN = {
    "backbone": "tiny",
    "tiny": {"vision_hidden": 64, "vision_layers": 1, "text_hidden": 128, "text_layers": 2},
    "batch_size": 16,
    "lr": 3e-3,
    "warmup_steps": 5,
    "caption_task": False,
    "checkpoint_every": 0,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, one_thread):
    """``grace train`` on 10 images (3 held out), as a user runs it."""
    work = tmp_path_factory.mktemp("cli_run")
    data, ids, run = work / "data", work / "ids.json", work / "run"
    r = grace("data", "synth", "--n", "10", "--out", data, "--seed", "5", "--test-fraction", "0.3")
    assert r.exit_code == 0, r.output
    r = grace("ids", "assign", "--data", data, "--scheme", "numeric", "--out", ids)
    assert r.exit_code == 0, r.output
    (work / "train.json").write_text(json.dumps(SMALL_RUN))
    r = grace(
        "train", "--data", data, "--ids", ids, "--out", run, "--config", work / "train.json",
        "--epochs", "25", "--set", "describe_task=true",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"-> {run / 'model'}" in r.output and "grace train" not in r.output  # no bar in logs
    return work, data, IdentifierMap.load(ids), run / "model"


@pytest.mark.slow
def test_train_writes_a_model_with_the_settings_given(cli_run):
    _, _, _, model = cli_run
    info = json.loads((model / "grace.json").read_text())
    cfg = info["train_config"]
    assert info["complete"] and cfg["epochs"] == 25 and cfg["describe_task"] is True
    assert cfg["tiny"]["text_hidden"] == 128 and cfg["backbone"] == "tiny"


@pytest.mark.slow
def test_retrieve_json_describe_and_evaluate(cli_run):
    work, data, id_map, model = cli_run
    r = grace(
        "retrieve", "a red circle", "two shapes on gray", "--model", model, "--k", "3", "--json"
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)  # stdout is only the JSON (loading bars go to stderr)
    assert len(rows) == 2 and all(1 <= len(row) <= 3 for row in rows)
    for h in (h for row in rows for h in row):
        assert set(h) == {"identifier", "key", "path", "score"}
        assert h["identifier"] in id_map.ids[h["key"]] and h["path"].startswith("images/")

    ident = id_map.ids[next(iter(id_map.ids))][0]
    r = grace("describe", ident, "--model", model)
    assert r.exit_code == 0, r.output
    described = [ln for ln in r.stdout.splitlines() if ln.startswith(f"{ident}:")]
    assert len(described) == 1 and described[0].split(":", 1)[1].strip(), r.stdout

    out = work / "eval"
    r = grace(
        "evaluate", "--model", model, "--data", data, "--out", out, "--gallery", "test",
        "--dense", "dual-encoder", "--dense-seconds", "2",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["valid_id_rate"] == 1.0
    assert {"grace_R@1", "dense_R@1", "memorization"} <= metrics.keys()
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "dense top-5" in page


def error_lines(r) -> list[str]:
    assert "Traceback" not in r.output, r.output
    return [ln for ln in r.output.splitlines() if ln.startswith("error:")]


@pytest.mark.slow
def test_model_commands_refuse_bad_input_with_one_line_and_exit_2(cli_run, tmp_path):
    work, data, id_map, model = cli_run
    r = grace("describe", "4242", "--model", model)
    assert r.exit_code == 2 and error_lines(r) == [
        "error: unknown identifier '4242' (not a live id of this model)"
    ]
    r = grace("retrieve", "a red circle", "--model", tmp_path / "nowhere")
    assert r.exit_code == 2 and len(error_lines(r)) == 1 and "nowhere" in r.output
    with pytest.MonkeyPatch.context() as mp:  # refused before a minute of baseline training
        mp.setattr("grace.cli.model._embedder", lambda *a: pytest.fail("trained a baseline first"))
        r = grace("evaluate", "--model", model, "--data", data, "--out", tmp_path, "--gallery", "x")
    assert r.exit_code == 2 and len(error_lines(r)) == 1 and "gallery" in r.output
    ids = work / "ids.json"
    for setting, why in [("lr", "--set 'lr': expected KEY=VALUE"), ("lr_typo=1", "'lr_typo'")]:
        r = grace("train", "--data", data, "--ids", ids, "--out", tmp_path / "r", "--set", setting)
        assert r.exit_code == 2 and len(error_lines(r)) == 1, r.output
        assert why in error_lines(r)[0]
    r = grace("train", "--data", tmp_path / "none", "--ids", ids, "--out", tmp_path / "r")
    assert r.exit_code == 2 and len(error_lines(r)) == 1 and "none" in r.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_backbone_from_the_config_file_is_not_overridden(cli_run, tmp_path):
    """A backbone named in --config or --set is used unless --backbone says otherwise."""
    work, data, _, model = cli_run
    cfg = {**SMALL_RUN, "backbone": str(model), "epochs": 1}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    r = grace(
        "train", "--data", data, "--ids", work / "ids.json", "--out", run,
        "--config", tmp_path / "cfg.json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    info = json.loads((run / "model" / "grace.json").read_text())
    assert info["train_config"]["backbone"] == str(model)


def test_concurrent_extends_of_one_map_keep_every_new_identifier(tmp_path):
    # Two real processes extend the same map with different new images; without the lock each
    # loads the old map and the second save drops the first one's additions.
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "grace"
    for name, n, seed in (("base", 5, 11), ("a", 1000, 12), ("b", 1000, 13)):
        assert (
            grace("data", "synth", "--n", n, "--out", tmp_path / name, "--seed", seed).exit_code
            == 0
        )
    ids = tmp_path / "ids.json"
    assert (
        grace(
            "ids", "assign", "--data", tmp_path / "base", "--scheme", "atomic", "--out", ids
        ).exit_code
        == 0
    )
    procs = [
        subprocess.Popen(
            [exe, "ids", "extend", "--ids", ids, "--data", tmp_path / name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    m = IdentifierMap.load(ids)
    expected = {r.key for name in ("base", "a", "b") for r in _records(tmp_path / name)}
    assert set(m.ids) == expected and len({i for i, _ in m.identifiers()}) == len(expected)


def _records(folder):
    from grace.data.imageset import load_records

    return load_records(folder)
