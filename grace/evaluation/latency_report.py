"""Reporting a query-latency benchmark: the log-log plot, the MLflow run, the markdown tables.

The results are what :mod:`grace.evaluation.query_latency` measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_latency(results: dict[str, Any] | list[dict[str, Any]], path: str | Path) -> Path:
    """Plot per-query milliseconds against catalog size (log-log) as a PNG at ``path``.

    Every GRACE series of each backbone's run is drawn, and the dense series of the first run
    only (the same method in each).

    Args:
        results: One benchmark result, or one per backbone.
        path: Where the PNG goes.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [results] if isinstance(results, dict) else results
    grace_labels = {
        "grace_ms": "trie beam search",
        "grace_batched_ms": "batched",
        "generate_ms": "via generate (before)",
    }
    dense_labels = {
        "dense_ms": "dense brute force (torch)",
        "dense_batched_ms": "dense brute force, batched",
        "faiss_ms": "FAISS flat",
        "faiss_batched_ms": "FAISS flat, batched",
    }
    kinds = [*grace_labels, "with_encoder", *dense_labels]
    colours = {k: f"C{j}" for j, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, res in enumerate(results):
        rows = res["rows"]
        sizes = [r["ids"] for r in rows]
        name = res["config"].get("backbone", "tiny")
        series = {k: f"GRACE {name}, {v}" for k, v in grace_labels.items()}
        if "encode_ms" in rows[0]:
            series["with_encoder"] = f"GRACE {name} + MiniLM encoding"
        if i == 0:
            series.update(dense_labels)
        for key, label in series.items():
            if key == "with_encoder":
                ys = [r["grace_ms"] + r["encode_ms"] for r in rows]
            elif key in rows[0]:
                ys = [r[key] for r in rows]
            else:
                continue
            # a colour per kind of series, a marker and line per backbone
            style = "--s" if key in dense_labels else ("-o" if i == 0 else "-.^")
            ax.plot(sizes, ys, style, color=colours[key], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images in the catalog")
    ax.set_ylabel("ms per query")
    ax.set_title(f"Query latency, {results[0]['config']['threads']} thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_mlflow(result: dict[str, Any], png: Path, tracking_uri: str | None) -> str:
    """One MLflow run: the settings as params, every figure as a metric, the plot as artifact."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("grace-bench")
    with mlflow.start_run(run_name="query-latency") as run:
        mlflow.log_params({k: str(v) for k, v in result["config"].items()})
        metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        for r in result["rows"]:
            mlflow.log_metrics(
                {k: float(v) for k, v in r.items() if k.endswith("_ms")}, step=int(r["ids"])
            )
        mlflow.log_artifact(str(png))
        return run.info.run_id


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def markdown_report(results: list[dict[str, Any]]) -> str:
    """The results as markdown: one table per backbone and thread count, and the targets.

    Each latency target is reported met or missed.
    """
    lines = []
    for res in results:
        cfg, rows = res["config"], res["rows"]
        has_gen, has_faiss = "generate_ms" in rows[0], "faiss_ms" in rows[0]
        has_enc = "encode_ms" in rows[0]
        lines += [
            f"### {cfg.get('backbone', 'tiny')} backbone, {cfg['threads']} thread(s): "
            f"{cfg['queries']} queries, {cfg['num_beams']} beams, batches of "
            f"{cfg['batch_size']}, medians of {cfg['repeats']} interleaved rounds",
            "",
            "Milliseconds per query. *single*: one query per call; *batched*: "
            f"{cfg['batch_size']} queries per call. *plain*: the same search without the trie."
            + (
                " *MiniLM*: the frozen sentence encoding a lite query pays before its search "
                "(not in the GRACE columns)."
                if has_enc
                else ""
            ),
            "",
        ]
        head = ["ids", "steps", "GRACE single", "GRACE batched"]
        if has_enc:
            head += ["MiniLM single", "MiniLM batched"]
        if has_gen:
            head += ["generate single (before)", "speed-up", "generate batched", "speed-up"]
        head += ["plain single", "trie overhead", "plain batched", "trie overhead"]
        head += ["dense single", "dense batched"]
        if has_faiss:
            head += ["FAISS single", "FAISS batched"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for r in rows:
            cells = [f"{r['ids']:,}", str(r["steps"])]
            cells += [f"{r['grace_ms']:.2f}", f"{r['grace_batched_ms']:.2f}"]
            if has_enc:
                cells += [f"{r['encode_ms']:.2f}", f"{r['encode_batched_ms']:.2f}"]
            if has_gen:
                cells += [
                    f"{r['generate_ms']:.2f}",
                    f"{r['generate_ms'] / r['grace_ms']:.2f}x",
                    f"{r['generate_batched_ms']:.2f}",
                    f"{r['generate_batched_ms'] / r['grace_batched_ms']:.2f}x",
                ]
            cells += [
                f"{r['plain_ms']:.2f}",
                f"{100 * (r['grace_ms'] / r['plain_ms'] - 1):+.1f} %",
                f"{r['plain_batched_ms']:.2f}",
                f"{100 * (r['grace_batched_ms'] / r['plain_batched_ms'] - 1):+.1f} %",
            ]
            cells += [f"{r['dense_ms']:.2f}", f"{r['dense_batched_ms']:.2f}"]
            if has_faiss:
                cells += [f"{r['faiss_ms']:.2f}", f"{r['faiss_batched_ms']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        first, last = rows[0], rows[-1]
        lines += ["", "Targets:"]
        for mode, label in (("", "single"), ("_batched", "batched")):
            ratio = last[f"grace{mode}_ms"] / first[f"grace{mode}_ms"]
            lines.append(
                f"- GRACE {label} latency({last['ids']:,}) / latency({first['ids']:,}) = "
                f"{ratio:.2f} (target <= 1.10): {_verdict(ratio <= 1.10)}."
            )
        for mode, label in (("", "single"), ("_batched", "batched")):
            over = res[f"trie_overhead{mode}"]
            lines.append(
                f"- Trie masking overhead, {label} (median over sizes and rounds of the ratio "
                f"within a round): {100 * over:+.1f} % (target <= 5 %): "
                f"{_verdict(over <= 0.05)}."
            )
        for mode, label in (("", "single"), ("_batched", "batched")):
            lines.append(
                f"- Per-query cost against its floor, {label}: "
                f"{res[f'grace{mode}_over_floor']:.1f}x the floor of "
                f"{res[f'floor{mode}_ms']:.2f} ms ({res['gflop_per_query']:.3f} GFLOP of linear "
                f"layers per query at {res[f'gflops{mode}']:.0f} GFLOP/s, the rate of the "
                "model's own matmuls alone at this shape, measured each round) (target <= 2x): "
                f"{_verdict(res[f'grace{mode}_over_floor'] <= 2)}."
            )
        for key in sorted(
            (k for k in res if k.startswith("crossover_")), key=lambda k: (len(k), k)
        ):
            at = res[key]
            text = "beyond 1e9" if at == float("inf") else f"~{at:,.0f}"
            whole = key.endswith("_with_encoder")
            what = key.removeprefix("crossover_").removesuffix("_with_encoder").replace("_", " ")
            who = "GRACE + MiniLM encoding" if whole else "GRACE"
            lines.append(
                f"- Crossover, {who} against {what}: {text} images (target <= 300,000): "
                f"{_verdict(at <= 300_000)}."
            )
        lines.append("")
    return "\n".join(lines)
