"""`runs/<name>/report.html`: one self-contained page (plots embedded, no external files or scripts) with what a
search found: the state and best so far, the full-budget table with the baselines, the plots, the winner's recipe,
the Pareto front of a multi-objective run, and every trial. Written at the end of a search and refreshed while it
runs (at most every `REFRESH_SECONDS`)."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

REPORT_FILE = "report.html"
REFRESH_SECONDS = 10.0
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.winner td { font-weight: bold; background: #eef6ee; }
tr.failed td { color: #a00; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
.note { color: #666; font-size: 0.9em; }
"""


def write_report(run_dir: Path, records: list[dict], final: dict | None = None) -> Path:
    """Write (atomically) the report of the run in ``run_dir``; ``final`` is final_scores.json's content once the
    search has ended, else None (a run in progress)."""
    from auto_merge.output_dirs import write_text_atomic

    path = Path(run_dir) / REPORT_FILE
    write_text_atomic(path, render_report(Path(run_dir), records, final))
    return path


def render_report(run_dir: Path, records: list[dict], final: dict | None) -> str:
    from auto_merge.search.baselines import comparison_lines
    from auto_merge.search.progress import best_so_far, best_text

    manifest = _read_json(run_dir / "run.json") or {}
    strategy = (manifest.get("strategy") or {}).get("strategy", "?")
    state = "finished" if final is not None else "in progress"
    best = best_so_far(records)
    parts = [f"<h1>auto-merge run {_e(run_dir.name)}: {_e(strategy)}</h1>",
             f"<p>{_e(state)}; started {_e(manifest.get('started', '?'))}; {len(records)} trials; "
             f"{_e(best_text(best) if best else 'no trial has succeeded yet')}. "
             f"<span class='note'>Written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</span></p>"]
    if final is not None and final.get("winners"):
        parts.append("<h2>Full-budget scores</h2>")
        parts.append(_scores_table(final))
        parts.append("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in comparison_lines(final)) + "</ul>")
        for failure in final.get("failed", []):
            parts.append(f"<p class='note'>not scored: {_e(failure['what'])}: {_e(failure['error'])}</p>")
    plots = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot in plots:
            data = base64.b64encode(plot.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{_e(plot.stem)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption class='note'>{_e(plot.name)}</figcaption></figure>")
    if final is not None and final.get("winners"):
        import yaml

        winners = final["winners"]
        if len(winners) > 1:
            parts.append(f"<h2>Pareto front ({len(winners)} members)</h2>")
        for index, winner in enumerate(winners):
            title = "Winner's recipe" if len(winners) == 1 else f"Front member {index}: recipe"
            parts.append(f"<h3>{title}</h3><pre>{_e(yaml.safe_dump(winner.get('recipe'), sort_keys=False, default_flow_style=None))}</pre>")
    parts.append("<h2>Trials</h2>")
    parts.append(_trials_table(records))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>auto-merge: {_e(run_dir.name)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def final_rows(final: dict) -> list[tuple[str, dict]]:
    """(label, entry) of every full-budget score: base, experts, baselines, then the winner(s) (last)."""
    rows = [("base", final["base"])] if final["base"] else []
    rows += [(f"expert {m}", s) for m, s in final["experts"].items()]
    baselines = final.get("baselines") or {}
    if "uniform_task_arithmetic" in baselines:
        ta = baselines["uniform_task_arithmetic"]
        rows.append((f"uniform TA λ={ta['lambda']}", ta))
    if "ties" in baselines:
        rows.append((f"TIES d={baselines['ties']['density']} λ={baselines['ties']['lambda']}", baselines["ties"]))
    rows += [(f"winner {i}" if len(final["winners"]) > 1 else "winner", w) for i, w in enumerate(final["winners"])]
    return rows



def _scores_table(final: dict) -> str:
    rows = final_rows(final)
    winners = len(final["winners"])
    tasks = list(rows[-1][1]["scores"])
    head = "<tr><th>model</th>" + "".join(f"<th>{_e(t)}</th>" for t in tasks) + "<th>mean</th></tr>"
    body = "".join(
        f"<tr class='{'winner' if index >= len(rows) - winners else ''}'><td>{_e(label)}</td>"
        + "".join(f"<td>{entry['scores'].get(t, float('nan')):.3f}</td>" for t in tasks)
        + f"<td>{entry['mean_score']:.3f}</td></tr>" for index, (label, entry) in enumerate(rows))
    return f"<table>{head}{body}</table>"


def _trials_table(records: list[dict]) -> str:
    tasks = list(dict.fromkeys(t for r in records for t in (r.get("scores") or {})))  # the config's order
    head = ("<tr><th>trial</th><th>budget</th><th>status</th><th>score</th>"
            + "".join(f"<th>{_e(t)}</th>" for t in tasks) + "<th>seconds</th><th>error</th></tr>")
    rows = []
    for r in records:
        scores = r.get("scores") or {}
        budget = "all" if r.get("budget") is None else f"{r['budget']:g}"
        score = "" if r.get("score") is None else f"{r['score']:.3f}"
        seconds = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        css = "" if r.get("status") == "success" else "failed"
        rows.append(f"<tr class='{css}'><td>{r.get('trial')}</td><td>{budget}</td><td>{_e(r.get('status'))}</td>"
                    f"<td>{score}</td>" + "".join(f"<td>{scores[t]:.3f}</td>" if t in scores else "<td></td>"
                                                  for t in tasks)
                    + f"<td>{seconds}</td><td>{_e((r.get('error') or '')[:200])}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _e(value) -> str:
    return html.escape(str(value), quote=True)
