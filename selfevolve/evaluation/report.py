"""selfevolve report RUN_DIR [RUN_DIR ...] [out=DIR] — what happened in a run, as pictures.

Reads each run's metrics.jsonl, summary.json and config.yaml and writes `report.html` and
one PNG per plot into `out` (default RUN_DIR/report for one run, ./report for several):

    accuracy.png    acc_t1 / acc_t2 / delta per evaluation
    flips.png       delta_i2c vs delta_c2i per evaluation (SCoRe's "fixed" vs "broken")
    edit_ratio.png  how much the second attempt differs from the first (0 = it copies)
    reward_kl.png   reward and KL per training step (RL recipes)
    loss.png        training loss per step
    kept.png        kept vs rejected samples per iteration (filtering recipes)
    time_split.png  where the wall-clock time of a step went

An evolve run directory (`selfevolve evolve`'s: lineage.json) gets its own section instead:

    lineage.png     every version, its parent and the gate's decision
    served.png      the served version's and each candidate's target metric on the
                    validation traffic, round by round

Several run directories are overlaid, one colour per run. The HTML embeds the images (it
opens offline, and can be mailed as one file) and links each to its PNG. `selfevolve run`
writes the report of its own run when it finishes.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from selfevolve.errors import UserError
from selfevolve.evaluation.metrics import KEYS
from selfevolve.evaluation.protocol import with_interval
from selfevolve.files import atomic_write, read_metrics


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: list[str] = Field(..., min_length=1, description="run directories (positional: `selfevolve report A B`)")
    out: str | None = Field(None, description="output directory (default RUN_DIR/report, or ./report for several runs)")
    debug: bool = Field(False, description="show tracebacks instead of one-line errors")


class RunData:
    """One run directory, read once: its config, summary and metric rows split by kind."""

    def __init__(self, path: Path):
        if not (path / "config.yaml").is_file():
            raise UserError(f"{path} is not a run directory (no config.yaml)")
        self.path, self.name = path, path.resolve().name
        self.config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        self.recipe = self.config.get("recipe", "?")
        summary = path / "summary.json"
        self.summary = json.loads(summary.read_text()) if summary.is_file() else None
        rows = read_metrics(path / "metrics.jsonl")
        self.evals = [r for r in rows if "eval" in r]
        # the curves follow one split: validation during the run (test is only before / after)
        self.curve = [r for r in self.evals if r.get("split") == "validation"] or self.evals
        self.logged = [r for r in rows if "eval" not in r]
        self.steps = [r for r in rows if "step" in r and "eval" not in r and "warning" not in r]
        self.iterations = [r for r in rows if "kept" in r and "eval" not in r]
        self.warnings = [r for r in rows if "warning" in r]

    def eval_x(self) -> tuple[list[float], str]:
        """Evaluations are placed by training step when rounds are steps (SCoRe), else by
        their order (0 = before)."""
        rounds = [r.get("round", 0) for r in self.curve]
        if all(b > a for a, b in zip(rounds, rounds[1:])):
            return rounds, "step" if self.recipe == "score" else "round"
        return list(range(len(self.curve))), "evaluation"


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows, 1):
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool):
            xs.append(r.get("step", i))
            ys.append(r[key])
    return xs, ys


def _kept_rejected(r: dict) -> tuple[int, int]:
    """Kept (trained on) vs filtered out, from a filtering recipe's iteration row:
    ReST-EM kept/rejected, STaR kept+rationalised/rejected, SELF kept/evolved."""
    if "evolved" in r:
        return r["kept"], r["evolved"] - r["kept"]
    return r["kept"] + r.get("rationalised", 0), r.get("rejected", 0)


def _keys(rows: list[dict], test) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if test(k) and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen[k] = None
    return list(seen)


def _plots(runs: list[RunData], out: Path) -> dict[str, str]:
    """Draw every plot that has data in at least one run; return {file name: caption}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    label = (lambda r: r.name) if len(runs) > 1 else (lambda r: "")
    made: dict[str, str] = {}

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made[name] = caption

    def eval_plot(name: str, caption: str, keys: list[str], title: str) -> None:
        if not any(r.curve for r in runs):
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        styles = ["-o", "--s", ":^"]
        for c, run in zip(colours * 10, runs):
            xs, xlabel = run.eval_x()
            for style, k in zip(styles, keys):
                ax.plot(xs, [e.get(k) for e in run.curve], style, color=c, label=f"{label(run)} {k}".strip())
            ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, name, caption)

    eval_plot("accuracy.png", "Validation accuracy of the first and the last attempt, and their difference.",
              ["acc_t1", "acc_t2", "delta"], "accuracy per evaluation")
    eval_plot("flips.png", "Share of tasks fixed by the revision (i2c) and broken by it (c2i).",
              ["delta_i2c", "delta_c2i"], "incorrect→correct vs correct→incorrect")
    eval_plot("edit_ratio.png", "Normalised edit distance between the attempts (0: the revision copies the answer).",
              ["edit_ratio"], "edit-distance ratio")

    rl = [_keys(run.steps, lambda k: k.startswith(("reward", "kl"))) for run in runs]
    if any(rl):
        fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
        for c, run, keys in zip(colours * 10, runs, rl):
            for k in keys:
                ax = ax_r if k.startswith("reward") else ax_k
                ax.plot(*_series(run.steps, k), "-", color=c, alpha=0.9 if k.endswith(("t2", "margin")) else 0.5,
                        label=f"{label(run)} {k}".strip())
        for ax, t in ((ax_r, "reward per step"), (ax_k, "KL to the reference per step")):
            ax.set_title(t)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        save(fig, "reward_kl.png",
             "Mean reward of the rollouts (or the preference margin) and the KL penalty, per update.")

    if any(_series(run.steps, "loss")[0] for run in runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        for c, run in zip(colours * 10, runs):
            ax.plot(*_series(run.steps, "loss"), "-", color=c, label=label(run) or "loss")
        ax.set_title("training loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "loss.png", "Training loss per logged step.")

    if any(run.iterations for run in runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(runs))
        for j, (c, run) in enumerate(zip(colours * 10, runs)):
            if not run.iterations:
                continue
            its = [r.get("iteration", r.get("phase", i)) for i, r in enumerate(run.iterations)]
            kept, other = zip(*map(_kept_rejected, run.iterations))
            x = [i - 0.4 + width * (j + 0.5) for i in its]  # each iteration's bars centred on it
            ax.bar(x, kept, width, color=c, label=f"{label(run)} kept".strip())
            ax.bar(x, other, width, bottom=kept, color=c, alpha=0.35, label=f"{label(run)} rejected".strip())
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title("kept vs rejected samples")
        ax.legend(fontsize=8)
        save(fig, "kept.png", "Samples kept for training (solid) and filtered out (light), per iteration.")

    splits = {
        run.name: {k[5:]: sum(_series(run.logged, k)[1]) for k in _keys(run.logged, lambda k: k.startswith("time_"))}
        for run in runs
    }
    if any(splits.values()):
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.6 * len(runs)))
        parts = list(dict.fromkeys(p for s in splits.values() for p in s))
        for i, p in enumerate(parts):
            lefts = [sum(s.get(q, 0) / (sum(s.values()) or 1) for q in parts[:i]) for s in splits.values()]
            ax.barh(list(splits), [s.get(p, 0) / (sum(s.values()) or 1) for s in splits.values()], left=lefts,
                    color=colours[i % len(colours)], label=p)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of logged wall-clock time")
        ax.legend(
            fontsize=8,
            ncol=min(len(parts), 5),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.45 if len(runs) == 1 else -0.2),
        )
        save(fig, "time_split.png",
             "Where the time of the logged steps went (generation, verification, training, sync, ...).")
    return made


def _table(rows: list[list[Any]], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _run_section(run: RunData) -> str:
    s = run.summary
    keys = KEYS + tuple(k for k in ("maj_at_k", "pass_at_k", "p_flip") if s and k in s["after"])
    if s and s.get("before"):
        summary = _table([[k, with_interval(s["before"], k), with_interval(s["after"], k)] for k in keys],
                         ["metric", "before", "after"])
    elif s:
        summary = _table([[k, with_interval(s["after"], k)] for k in keys], ["metric", "value"])
    else:
        summary = "<p><b>unfinished run</b> (no summary.json): the evaluations below are all it logged.</p>"
    evals = _table([[e["eval"]] + [e.get(k) for k in KEYS] for e in run.evals], ["evaluation", *KEYS])
    warnings = "".join(
        f"<p class=warn>step {html.escape(str(w.get('step')))}: {html.escape(w['warning'])}</p>" for w in run.warnings
    )
    config = html.escape(yaml.safe_dump(run.config, sort_keys=False))
    protocol = ", ".join(f"{k}: {v}" for k, v in (s or {}).get("protocol", {}).items())
    return (
        f"<h2>{html.escape(run.name)} <small>recipe={html.escape(run.recipe)}</small></h2>"
        f"<p>{html.escape(str(run.path.resolve()))}</p><p>{html.escape(protocol)} (95% intervals)</p>"
        f"{summary}{warnings}"
        f"<details><summary>all evaluations</summary>{evals}</details>"
        f"<details><summary>config</summary><pre>{config}</pre></details>"
    )


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%}.warn{color:#a60}figure{margin:1.5em 0}"""


def _seeds_section(path: Path) -> str:
    """Mean ± std over the seeds of a `seeds=` directory (seeds.json)."""
    sj = json.loads((path / "seeds.json").read_text())
    cols = [w for w in ("before", "after") if w in sj]
    rows = [[k] + [f"{sj[w][k]['mean']:.3f} ± {sj[w][k]['std']:.3f}" if k in sj[w] else "" for w in cols]
            for k in sj.get("after", {})]
    return (f"<h2>{html.escape(path.resolve().name)} <small>recipe={html.escape(sj['recipe'])}, seeds "
            f"{html.escape(str(sj['seeds']))}: mean ± std (test split)</small></h2>{_table(rows, ['metric', *cols])}")


def _evolve_section(path: Path, out: Path) -> tuple[str, dict[str, str]]:
    """An evolve run: the rounds' table, the lineage drawn, and the served accuracy on the
    validation traffic over rounds (after each round: the candidate's if promoted, else the
    version that stayed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    graph = nx.node_link_graph(json.loads((path / "lineage.json").read_text()), edges="edges")
    rounds = sorted((n for n in graph if n != "base"), key=lambda n: int(n.split("-")[1]))
    info = {n: graph.nodes[n] for n in rounds}
    rows = [[n, next(iter(graph.predecessors(n)), ""), d["decision"], d.get("metric", ""),
             f"{d['current']:.3f} -> {d['candidate']:.3f}" if "current" in d else d.get("reason", ""),
             f"{d['gain_points']:+.1f} ({d['wins']} won, {d['losses']} lost, p = {d['p_value']:.3g})"
             if "gain_points" in d else "", d.get("window", "")] for n, d in info.items()]
    table = _table(rows, ["version", "parent", "decision", "metric", "served -> candidate",
                          "gain in points (sign test)", "traces in window"])
    made = {}
    colour = {"served": "#888", "promoted": "#2a7", "rejected": "#c33", "failed": "#333"}
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(graph)), 3))
    pos = {n: (i, 0 if n == "base" or graph.nodes[n]["decision"] == "promoted" else -1)
           for i, n in enumerate(["base", *rounds])}
    nx.draw_networkx(graph, pos, ax=ax, node_color=[colour.get(graph.nodes[n]["decision"], "#888") for n in graph],
                     node_size=1400, font_size=8, font_color="white", arrowsize=14)
    ax.set_title("lineage: green promoted, red rejected, black failed")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "lineage.png", dpi=110)
    plt.close(fig)
    made["lineage.png"] = "Every version and the one it was trained from; promoted versions on the top row."
    gated = [n for n in rounds if "current" in info[n]]
    if gated:
        served = [info[n]["candidate"] if info[n]["decision"] == "promoted" else info[n]["current"] for n in gated]
        fig, ax = plt.subplots(figsize=(7, 4))
        x = list(range(len(gated)))
        ax.plot(x, served, "-o", label="served after the round")
        ax.plot(x, [info[n]["candidate"] for n in gated], "x", label="candidate")
        ax.set_xticks(x, gated)
        ax.set_ylabel(info[gated[0]]["metric"] + " (validation traffic, greedy)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "served.png", dpi=110)
        plt.close(fig)
        made["served.png"] = ("The served version's accuracy on the validation traffic after each round (the "
                              "validation set grows with the traffic: each round's pair is on its own set).")
    return f"<h2>{html.escape(path.resolve().name)} <small>selfevolve evolve</small></h2>{table}", made


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Render the report of one or several runs; return the path of report.html. A `seeds=`
    directory shows its mean ± std and each seed's run."""
    runs, spreads, evolved = [], [], []
    for d in run_dirs:
        d = Path(d)
        if not d.is_dir():
            raise UserError(f"run directory not found: {d}")
        if (d / "lineage.json").is_file():
            evolved.append(d)
        elif (d / "seeds.json").is_file():
            spreads.append(_seeds_section(d))
            runs += [RunData(d / r) for r in json.loads((d / "seeds.json").read_text())["runs"]]
        else:
            runs.append(RunData(d))
    alone = [*runs, *evolved]
    out = Path(out) if out else ((getattr(alone[0], "path", alone[0])) / "report" if len(alone) == 1
                                 else Path("report"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"out={out}: cannot create it ({e.strerror})") from None
    plots = _plots(runs, out) if runs else {}
    for d in evolved:
        section, made = _evolve_section(d, out)
        spreads.append(section)
        plots.update(made)
    figures = "".join(
        f'<figure><a href="{name}"><img src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}" '
        f'alt="{name}"></a><figcaption>{html.escape(caption)} <a href="{name}">{name}</a></figcaption></figure>'
        for name, caption in plots.items()
    )
    title = "selfevolve report: " + ", ".join([*(r.name for r in runs), *(d.resolve().name for d in evolved)])
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        + "".join(spreads) + "".join(_run_section(r) for r in runs)
        + f"<h2>plots</h2>{figures or '<p>nothing logged yet</p>'}</body></html>"
    )
    atomic_write(out / "report.html", page)
    return out / "report.html"


def main(cfg: ReportConfig) -> None:
    path = write_report([Path(r) for r in cfg.runs], Path(cfg.out) if cfg.out else None)
    print(f"report: {path}")
