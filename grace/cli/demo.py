"""``grace demo --ids-only``: the demo set, identifiers of every kind, and their tries."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from grace.identifiers import SCHEME_NAMES, assign_identifiers
from grace.retrieval.index import identifier_stats


def run_ids_demo(
    data: Path = Path("data"),
    work: Path = Path("work/demo"),
    n: int = 1000,
    embedder_seconds: float = 60.0,
    echo: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Generate (or validate) the demo set, assign each identifier kind, print statistics."""
    from grace.data.imageset import scan_image_set, summarize
    from grace.data.synth import synthesize
    from grace.models.embedders import make_embedder

    if (data / "images").is_dir():
        echo(f"== image set: {data} (present; validating)")
        records = scan_image_set(data)
    else:
        echo(f"== image set: generating {n} demo images into {data}")
        records = synthesize(data, n=n)
    for k, v in summarize(records).items():
        echo(f"  {k}: {v}")

    results: dict[str, dict] = {}
    embedder = None
    for scheme in SCHEME_NAMES:
        t0 = time.perf_counter()
        if scheme == "structured" and embedder is None:
            echo(f"== training the dual-encoder image embedder ({embedder_seconds:.0f} s budget)")
            embedder = make_embedder("dual-encoder", records, data, max_seconds=embedder_seconds)
            t0 = time.perf_counter()
        emb = embedder if scheme == "structured" else None
        id_map = assign_identifiers(records, scheme, embedder=emb, root=data)
        id_map.save(work / f"ids_{scheme}.json")
        stats = identifier_stats(id_map, records)
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        results[scheme] = stats
        example = id_map.identifiers()[0][0]
        echo(f"== {scheme}: e.g. {example!r} -> {work / f'ids_{scheme}.json'}")
    echo("")
    cols = [
        "images",
        "identifiers",
        "new_vocabulary_tokens",
        "tokens_per_id_mean",
        "tokens_per_id_max",
        "trie_nodes",
        "trie_bytes",
        "seconds",
    ]
    echo("| scheme | " + " | ".join(cols) + " |")
    echo("|---" * (len(cols) + 1) + "|")
    for scheme, st in results.items():
        echo(f"| {scheme} | " + " | ".join(str(st[c]) for c in cols) + " |")
    return results
