"""PNG charts of a run (matplotlib, imported only here and only when --charts is given, so the rest
of the bench and its smoke test do not need it). One chart per scenario: the median of each path
with its min..max over rounds; latency scenarios also get p50 / p99 / p999 per path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def render(out_dir: Path, scenarios: Sequence[Mapping[str, Any]], machine: Mapping[str, Any]) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--charts needs matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    foot = f"{machine.get('date', '')}  {machine.get('nproc', '?')} CPUs  {machine.get('cpu_model', '')}"
    written = []
    for sc in scenarios:
        rows = [s for s in sc["summaries"] if "ops_median" in s]
        if rows:
            fig, ax = plt.subplots(figsize=(7, 3.6))
            names = [s["path"] for s in rows]
            med = [s["ops_median"] for s in rows]
            err = [[m - s["ops_min"] for m, s in zip(med, rows)], [s["ops_max"] - m for m, s in zip(med, rows)]]
            colors = ["tab:orange" if n.startswith("broker") else "tab:gray" if n in ("zmq-echo", "raw") else "tab:blue"
                      for n in names]
            ax.bar(names, med, yerr=err, capsize=4, color=colors)
            ax.set_ylabel(sc["unit"])
            ax.set_title(f"{sc['name']}: {sc['what']}", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            fig.text(0.01, 0.01, foot + f"  ({sc['rounds']} rounds, median and min..max)", fontsize=6)
            fig.tight_layout(rect=(0, 0.04, 1, 1))
            path = out_dir / f"{sc['name']}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        lat = [s for s in rows if s.get("p999_us") is not None and s.get("samples", 0) >= 1000]
        if lat and sc.get("latency"):
            fig, ax = plt.subplots(figsize=(7, 3.6))
            width = 0.25
            for i, p in enumerate(("p50_us", "p99_us", "p999_us")):
                ax.bar([j + i * width for j in range(len(lat))], [s[p] for s in lat], width, label=p[:-3])
            ax.set_xticks([j + width for j in range(len(lat))], [s["path"] for s in lat], fontsize=8)
            ax.set_ylabel("latency per call, us")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax.set_title(f"{sc['name']}: latency", fontsize=9)
            fig.text(0.01, 0.01, foot, fontsize=6)
            fig.tight_layout(rect=(0, 0.04, 1, 1))
            path = out_dir / f"{sc['name']}-latency.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
