"""Render deploy/grafana/relay.json's panels with matplotlib, from a Prometheus.

Grafana is not needed: every panel's queries run on Prometheus's HTTP API
(``query_range``) and are drawn in the dashboard's own layout, time series
as lines and heat maps as per-bucket counts. This is how the README's
picture of the dashboard is made; it also gives a quick look at a relay
where no Grafana runs.

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 \\
        --minutes 15 --out relay-dashboard.png

Needs matplotlib (``pip install 'relay[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).with_name("relay.json")


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    params = urllib.parse.urlencode(
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    )
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as answer:
        data = json.load(answer)
    if data.get("status") != "success":
        raise RuntimeError(f"{expr}: {data.get('error')}")
    return list(data["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for name, value in labels.items():
        text = text.replace("{{" + name + "}}", value)
    return text.strip() or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")


def fill(expr: str, rate_interval: str) -> str:
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$job", ".+")
        .replace("$instance", ".+")
    )


def render(
    prometheus: str,
    out: Path,
    *,
    minutes: float = 15,
    rate_interval: str = "1m",
    dashboard: Path = DASHBOARD,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors
    from matplotlib.gridspec import GridSpec

    spec = json.loads(dashboard.read_text())
    panels = spec["panels"]
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(20, rows * 0.55), facecolor="#181b1f")
    grid = GridSpec(rows, 24, figure=fig, hspace=2.2, wspace=1.2)
    fig.suptitle(
        f"{spec['title']}: matplotlib rendering of the Grafana dashboard's queries "
        f"(last {minutes:g} min)",
        color="#d8d9da",
        fontsize=14,
    )
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(
            grid[pos["y"] : pos["y"] + pos["h"] - 1, pos["x"] : pos["x"] + pos["w"]]
        )
        ax.set_facecolor("#111217")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=11, loc="left")
        ax.tick_params(colors="#9fa7b3", labelsize=8)
        for side in ax.spines.values():
            side.set_color("#2c3235")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if panel["type"] == "heatmap":
            target = panel["targets"][0]
            series = query_range(prometheus, fill(target["expr"], rate_interval), start, end, step)
            bounds = sorted(
                (math.inf if s["metric"]["le"] == "+Inf" else float(s["metric"]["le"]), s)
                for s in series
            )
            times = sorted({float(t) for _, s in bounds for t, _ in s["values"]})
            index = {t: i for i, t in enumerate(times)}
            cumulative = [[0.0] * len(times) for _ in bounds]
            for row, (_, s) in enumerate(bounds):
                for t, v in s["values"]:
                    value = float(v)
                    cumulative[row][index[float(t)]] = 0.0 if math.isnan(value) else value
            counts = [
                [cumulative[r][c] - (cumulative[r - 1][c] if r else 0.0) for c in range(len(times))]
                for r in range(len(bounds))
            ]
            if times:
                x = [(t - end) / 60 for t in times] + [(times[-1] + step - end) / 60]
                mesh = ax.pcolormesh(
                    x,
                    range(len(bounds) + 1),
                    [[max(v, 0.0) for v in row] for row in counts],
                    cmap="inferno",
                    norm=colors.SymLogNorm(linthresh=1, vmin=0),
                    shading="flat",
                )
                fig.colorbar(mesh, ax=ax, pad=0.01).ax.tick_params(colors="#9fa7b3", labelsize=7)
            ax.set_yticks([i + 1 for i in range(len(bounds))])
            ax.set_yticklabels(["+Inf" if b == math.inf else f"{b:g}s" for b, _ in bounds])
            ax.set_ylabel("bucket (≤)", color="#9fa7b3", fontsize=8)
        else:
            for target in panel["targets"]:
                expr = fill(target["expr"], rate_interval)
                for s in query_range(prometheus, expr, start, end, step):
                    xs = [(float(t) - end) / 60 for t, _ in s["values"]]
                    ys = [float(v) for _, v in s["values"]]
                    if unit == "percentunit":
                        ys = [y * 100 for y in ys]
                    label = legend(target["legendFormat"], s["metric"])
                    ax.plot(xs, ys, linewidth=1.2, label=label)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left", facecolor="#181b1f", labelcolor="#d8d9da")
            ax.set_ylabel({"percentunit": "%"}.get(unit, unit), color="#9fa7b3", fontsize=8)
            ax.grid(color="#2c3235", linewidth=0.5)
        ax.set_xlabel("minutes", color="#9fa7b3", fontsize=8)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    parser.add_argument("--out", type=Path, default=Path("relay-dashboard.png"))
    args = parser.parse_args()
    render(args.prometheus, args.out, minutes=args.minutes, rate_interval=args.rate_interval)


if __name__ == "__main__":
    main()
