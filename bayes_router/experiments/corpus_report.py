"""The corpus report: statistics of a corpus (``data.json``), its most frequent characters or
oracle labels (``data.png``) and ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from bayes_router.analysis.study_plots import plot_shares, save_figure
from bayes_router.data import corpus_statistics, load_corpus
from bayes_router.experiments.json_files import write_json


def corpus_report(spec: str, out_dir: Path, max_chars: int | None = None,
                  **corpus_options) -> dict:
    """Statistics of a corpus into ``out_dir``: ``data.json``, ``data.png``, ``report.md``
    (``corpus_options``: ``seed`` and a synthetic task's ``seq_len``, ``window``, ...)."""
    stats = corpus_statistics(load_corpus(spec, max_chars=max_chars, **corpus_options),
                              top_k=30)
    stats["max_chars"] = max_chars
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "data.json", stats)
    if stats["kind"] == "text":
        labels = ["space" if c == " " else repr(c)[1:-1] for c, _ in stats["top_characters"]]
        shares = [p for _, p in stats["top_characters"]]
        title = "most frequent characters"
    else:
        labels, shares = list(stats["oracle_label_share"]), list(
            stats["oracle_label_share"].values())
        title = "oracle label share of the targets"
    fig = Figure(figsize=(9, 3))
    plot_shares(labels, shares, ax=fig.add_subplot(), title=f"{stats['name']}: {title}")
    save_figure(fig, out_dir / "data.png")
    lines = [f"# Corpus `{stats['name']}`", "", "```json",
             json.dumps({k: v for k, v in stats.items()
                         if k not in ("top_characters", "top_tokens")}, indent=2),
             "```", "", "![corpus](data.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return stats
