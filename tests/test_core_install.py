"""The library core (``pip install .``, no extras) assigns ids, trains and retrieves.

The extras' packages are installed in the test environment, so the check blocks their import
in a fresh interpreter: any import of them on the library path fails the run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

EXTRAS = ("kfp", "mlflow", "dvc", "great_expectations", "deepspeed", "boto3", "moto")

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    for name in {extras!r}:
        sys.modules[name] = None  # import of it raises ImportError

    from grace import TrainConfig, assign_identifiers, train
    from grace.data.synth import synthesize
    from grace.models.settings import LiteBackboneConfig

    out = Path(sys.argv[1])
    records = synthesize(out / "data", n=6, seed=1, test_fraction=0.0)
    ids = assign_identifiers(records, "atomic")
    cfg = TrainConfig(
        lite=LiteBackboneConfig(hidden=32, layers=1, heads=2, vocab_size=300), epochs=2,
        batch_size=8, describe_task=False, caption_task=False, checkpoint_every=0, num_threads=1,
    )
    retriever = train(records, out / "data", ids, out / "run", cfg, progress=False)
    hits = retriever.retrieve([records[0].captions[0]], k=3)[0]
    assert len(hits) == 3 and all(h.identifier in ids.ids[h.key] for h in hits), hits
    print("core ok")
    """
).format(extras=EXTRAS)


def test_ids_training_and_retrieval_need_no_extra(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core ok" in result.stdout
