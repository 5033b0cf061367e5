"""The README's section from bench/matrix.py result CSVs: a markdown table and a plot.

Per method and density: mean ± sd over seeds (sample sd, n - 1) of the task's scores (EM:
PR-AUC, best F1, object F1 at IoU 0.2, CREMI score; speech: WER, CER, head and tail WER;
faces: top-1, ROC AUC, TAR at FAR 1e-2 and 1e-3; :data:`TASKS`), the achieved density and the
diagnostics. Then, per density, each BB variant against magnitude, random, dense (and the
forest, for EM) on the task's final score (PR-AUC, WER, top-1), seed by seed where both have
three seeds or more in common (runs of one seed share initial weights, data order and
validation boxes): a win (or a loss) only when the mean of the per-seed differences exceeds
their sd; otherwise a tie. Without three common seeds (the sd of two differences says little),
the difference of the means against the larger of the two seed sds; with one seed on either
side, no call. Each BB variant run at two densities or more is also compared with magnitude
and random over all its densities at once (:func:`pooled`: the per-seed differences pooled, a
paired t interval and p-value), which has more pairs than any one density. The plot: that
score against target density per method (mean, sd error bars, log x; dense and the baseline as
bands across all densities), and the rows run at one density beside it.

    .venv/bin/python bench/table.py bench/results/real_bb.csv --md out.md --png out.png

``--section vnc-1500`` writes the section (without its heading) into README.md between the
marks ``<!-- bench/table.py vnc-1500 -->`` and ``<!-- /bench/table.py vnc-1500 -->``; the
prose around them, the commands and the reading, stay as written.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: (CSV column, heading, decimals)
DIAGNOSTICS = (
    ("density_achieved", "edge density", 3),
    ("param_density", "param density", 3),
    ("entropy_mean", "on-rate entropy", 3),
    ("decorrelation", "decorrelation", 3),
    ("balance_r2", "balance R²", 3),
    ("seconds_per_step", "s / step", 3),  # wall time of training, validations included
)
METRICS = (
    ("val_pr_auc", "PR-AUC", 3),
    ("val_f1_best", "best F1", 3),
    ("object_f1_iou02", "object F1 IoU 0.2", 3),
    ("cremi_score", "CREMI score", 1),
    *DIAGNOSTICS,
)


@dataclass(frozen=True)
class TaskView:
    """How a task's rows are shown: its columns, and the score methods are called on."""

    metrics: tuple[tuple[str, str, int], ...]
    key: str  # the score of the comparisons and the plot
    label: str
    higher_is_better: bool = True


#: by the rows' ``task`` column (EM rows have none)
TASKS = {
    "em": TaskView(METRICS, "val_pr_auc", "validation PR-AUC"),
    "asr": TaskView(
        (
            ("val_wer", "WER", 3),
            ("val_cer", "CER", 3),
            ("val_wer_head", "WER head", 3),
            ("val_wer_tail", "WER tail", 3),
            *DIAGNOSTICS,
        ),
        "val_wer",
        "word error rate",
        higher_is_better=False,
    ),
    "faceid": TaskView(
        (
            ("val_top1", "top-1", 3),
            ("val_auc", "ROC AUC (unseen ids)", 3),
            ("val_tar_far1e-2", "TAR @ FAR 1e-2", 3),
            ("val_tar_far1e-3", "TAR @ FAR 1e-3", 3),
            *DIAGNOSTICS,
        ),
        "val_top1",
        "top-1 identification",
    ),
}


def rule(view: TaskView) -> str:
    better = "" if view.higher_is_better else " (lower is better)"
    return (
        "Runs of one seed share initial weights, data order and validation boxes, so each BB "
        "variant is compared with each rival seed by seed: a win (loss) is called only when "
        f"the mean of the per-seed differences of {view.label}{better} exceeds their sample "
        "standard deviation (paired: at 3 seeds that is a paired t above 1.73, two-sided "
        "p < 0.23: a screen, not a significance test); a smaller difference is a tie. Where "
        "the two share fewer than three seeds, the difference of the means is held against the "
        "larger of the two seed standard deviations; with one seed: no call."
    )


Row = Mapping[str, str]


def read(paths: Sequence[str | Path]) -> list[dict[str, str]]:
    from bbem.errors import UserError

    rows: list[dict[str, str]] = []
    for p in paths:
        try:
            with Path(p).open(newline="") as f:
                rows.extend(csv.DictReader(f))
        except OSError as e:
            raise UserError(f"cannot read the results CSV {p}: {e.strerror}") from None
    return rows


def densities_of(g: Mapping[tuple[str, str], Any], method: str) -> list[str]:
    """The density texts ``method`` ran at, highest first (dense and the forest: none)."""
    return sorted((d for m, d in g if m == method and d), key=float, reverse=True)


def values(rows: Sequence[Row], key: str) -> list[float]:
    """The finite numbers in column ``key`` (empty cells and NaN left out)."""
    out = []
    for r in rows:
        try:
            v = float(r.get(key) or "nan")
        except ValueError:
            continue
        if math.isfinite(v):
            out.append(v)
    return out


def mean_sd(v: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample sd (0 for one value); None when empty."""
    if not v:
        return None
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def cell(v: Sequence[float], digits: int) -> str:
    ms = mean_sd(v)
    if ms is None:
        return "-"
    if len(v) == 1:
        return f"{ms[0]:.{digits}f}"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def groups(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows by (method, density_target), in first-seen method order, densities descending."""
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        out.setdefault((r["method"], r["density_target"]), []).append(r)
    # the baseline first, as the reference the other rows stand beside
    order = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m != "baseline_rf")
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0][0]), -float(kv[0][1] or 2))))


def task_view(rows: Sequence[Row]) -> TaskView:
    """The view of the rows' task (``em`` when they name none); one task per table."""
    tasks = {r.get("task") or "em" for r in rows}
    if len(tasks) > 1:
        raise SystemExit(f"one task per table, got rows of {sorted(tasks)}")
    return TASKS[tasks.pop() if tasks else "em"]


def call(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> str:
    """``win`` / ``loss`` of ``a`` against ``b`` beyond the larger sd, ``tie``, or no call."""
    if len(a) < 2 or len(b) < 2:
        return "one seed: no call"
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)  # type: ignore[misc]
    diff, sd = ma - mb, max(sa, sb)
    return f"{verdict(diff, sd, higher_is_better)} ({diff:+.3f}, sd {sd:.3f})"


def verdict(diff: float, sd: float, higher_is_better: bool) -> str:
    """The one rule of both calls: ``win`` or ``loss`` when ``|diff|`` exceeds ``sd``, else ``tie``."""
    if abs(diff) <= sd:
        return "tie"
    return "win" if (diff > 0) == higher_is_better else "loss"


#: the rows every BB variant is called against
RIVALS = ("magnitude", "random", "dense", "baseline_rf")


def seed_diffs(a: Sequence[Row], b: Sequence[Row], key: str) -> list[float]:
    """``a - b`` on ``key`` for every seed both have (rows of one density each)."""
    by_seed = {r.get("seed"): v for r in b for v in values([r], key)}
    return [
        v - by_seed[r.get("seed")] for r in a for v in values([r], key) if r.get("seed") in by_seed
    ]


def pooled(rows: Sequence[Row]) -> list[str]:
    """Each BB variant run at two densities or more against magnitude and random, the per-seed
    differences pooled over every density both ran: mean, 95% t interval, two-sided paired t
    p-value. More pairs than one density has, so a smaller common difference shows; it assumes
    one difference for every density (each density's own call stays in the table above).
    Dense and the forest are left out: one run per seed serves every density, so their pairs
    would not be independent."""
    from scipy import stats

    view = task_view(rows)
    g = groups(rows)
    swept = [m for m in dict.fromkeys(m for m, _ in g) if is_bb(m) and len(densities_of(g, m)) > 1]
    rivals = [m for m in ("magnitude", "random") if any(mm == m for mm, _ in g)]
    if not swept or not rivals:
        return []
    lines = ["| BB variant | densities | " + " | ".join(f"vs {m}" for m in rivals) + " |"]
    lines.append("|" + "---|" * (len(rivals) + 2))
    for m in swept:
        cells = []
        dens = densities_of(g, m)
        for rival in rivals:
            diffs = [
                x
                for d in dens
                if (rival, d) in g
                for x in seed_diffs(g[(m, d)], g[(rival, d)], view.key)
            ]
            if len(diffs) < 3:
                cells.append("-")
                continue
            n, md, sd = len(diffs), statistics.mean(diffs), statistics.stdev(diffs)
            half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
            # every pair the same difference (sd 0): certain, unless that difference is 0
            p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else float(md == 0)
            ptext = "p < 0.001" if p < 0.001 else f"p {p:.3f}"
            cells.append(f"{md:+.3f} [{md - half:+.3f}, {md + half:+.3f}], {ptext}, {n} pairs")
        lines.append(f"| {m} | {', '.join(dens)} | " + " | ".join(cells) + " |")
    return lines


def paired_call(a: Sequence[Row], b: Sequence[Row], key: str, higher_is_better: bool = True) -> str:
    """:func:`call` on the per-seed differences ``a - b`` where three seeds or more are common to
    both (the seed fixes init, data order and boxes, so the pair differs only by the method),
    else :func:`call` on the two groups' values."""
    diffs = seed_diffs(a, b, key)
    if len(diffs) < 3:
        return call(values(a, key), values(b, key), higher_is_better)
    md, sd = statistics.mean(diffs), statistics.stdev(diffs)
    return (
        f"{verdict(md, sd, higher_is_better)} ({md:+.3f}, paired sd {sd:.3f}, {len(diffs)} seeds)"
    )


def is_bb(method: str) -> bool:
    """Every row but the rivals is a BB variant: ``bb_in``, ``bb_tiers`` and the named
    ablations (``noregrow``, ``spread025``, ``rank``, ...) alike."""
    return method not in RIVALS


def summary_table(rows: Sequence[Row]) -> list[str]:
    metrics = task_view(rows).metrics
    head = "| method | density | " + " | ".join(m[1] for m in metrics) + " | seeds |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for (method, dens), rs in groups(rows).items():
        cells = [cell(values(rs, k), digits) for k, _, digits in metrics]
        lines.append(f"| {method} | {dens or 'all'} | " + " | ".join(cells) + f" | {len(rs)} |")
    return lines


def comparisons(rows: Sequence[Row]) -> list[str]:
    view = task_view(rows)
    key = view.key
    g = groups(rows)
    densities = sorted({d for _, d in g if d}, key=float, reverse=True)
    methods = list(dict.fromkeys(m for m, _ in g))
    rivals = [m for m in RIVALS if m in methods]
    lines = ["| density | BB variant | " + " | ".join(f"vs {m}" for m in rivals) + " |"]
    lines.append("|" + "---|" * (len(rivals) + 2))
    for d in densities:
        for m in (m for m in methods if is_bb(m) and (m, d) in g):
            cells = []
            for rival in rivals:
                b = g.get((rival, d)) or g.get((rival, ""))  # dense and baseline: all densities
                cells.append(paired_call(g[(m, d)], b, key, view.higher_is_better) if b else "-")
            lines.append(f"| {d} | {m} | " + " | ".join(cells) + " |")
    return lines


def pooled_section(rows: Sequence[Row]) -> list[str]:
    lines = pooled(rows)
    if not lines:
        return []
    view = task_view(rows)
    better = "" if view.higher_is_better else " (below zero: BB's error is lower)"
    return [
        f"Over the densities (paired t): {view.label}, BB minus the rival seed by seed, pooled "
        f"over every density both ran{better}: the mean, its 95% t interval, the two-sided "
        "p-value, the number of pairs. It assumes one difference at every density (each "
        "density's own call is above). Dense and the forest are left out: one run per seed "
        "serves every density, so their pairs would not be independent.",
        "",
        *lines,
        "",
    ]


def provenance(rows: Sequence[Row]) -> list[str]:
    seen = dict.fromkeys(
        (r.get("config", ""), r.get("commit", ""), r.get("machine", ""), r.get("steps", ""))
        for r in rows
    )
    return [
        f"- `{c}`, {f'{s} steps' if s else 'random-forest baseline'}, commit {g}, {m}"
        for c, g, m, s in seen
    ]


def markdown(rows: Sequence[Row], title: str = "BB against dense, magnitude and random") -> str:
    """The section: a ``###`` heading over :func:`body`."""
    return f"### {title}\n\n" + body(rows)


def body(rows: Sequence[Row]) -> str:
    """The section without its heading: the summary table, the calls and the run list."""
    view = task_view(rows)
    once = (
        "Dense and the random-forest baseline (`baseline_rf`) are"
        if view is TASKS["em"]
        else "Dense is"
    )
    score = view.label[0].upper() + view.label[1:]
    parts = [
        f"Mean ± sd over seeds (sample sd). {once} one run per seed for all densities.",
        "",
        *summary_table(rows),
        "",
        f"{score} (final), BB against the baselines. {rule(view)}",
        "",
        *comparisons(rows),
        "",
        *pooled_section(rows),
        "Runs:",
        *provenance(rows),
    ]
    return "\n".join(parts) + "\n"


#: BB variants' colours: strong, and none of the rivals' greys, blue or green
BB_COLOURS = (
    "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
    "goldenrod", "darkred", "magenta", "navy", "teal", "sienna", "indigo",
)  # fmt: skip


def plot(rows: Sequence[Row], path: Path) -> Path:
    """The task's score per method, mean with sd error bars; dense and the forest as bands.

    Left: the methods run at two densities or more, against target density (log x). Right:
    the rows run at one density only (the ablations), side by side, each with the rivals' means
    at its density as dotted marks. Rivals are drawn in greys; rows of BB's first rule (``*_K``)
    with hollow markers and dashed lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view = task_view(rows)
    key = view.key
    g = groups(rows)
    methods = list(dict.fromkeys(m for m, _ in g))
    at = {m: densities_of(g, m) for m in methods}
    swept = [m for m in methods if len(at[m]) > 1]
    single = [m for m in methods if len(at[m]) == 1]
    bands = [m for m in methods if (m, "") in g]
    greys = {"magnitude": "0.25", "random": "0.6", "dense": "tab:blue", "baseline_rf": "tab:green"}
    bb = [m for m in methods if m not in greys]
    colour = {**greys, **{m: BB_COLOURS[i % len(BB_COLOURS)] for i, m in enumerate(bb)}}

    def style(m: str) -> dict[str, Any]:
        old = m.endswith("_K")  # BB's first spread rule
        return {
            "color": colour[m],
            "capsize": 3,
            "linestyle": "--" if old else "-",
            "marker": "o",
            "markerfacecolor": "white" if old else colour[m],
        }

    def ms_of(m: str, d: str) -> tuple[float, float] | None:
        return mean_sd(values(g[(m, d)], key)) if (m, d) in g else None

    wide = 1.0 + 0.35 * len(single)
    fig, axes = plt.subplots(
        1,
        2 if single else 1,
        figsize=(7.0 + (wide if single else 0), 4.4),
        sharey=True,
        gridspec_kw={"width_ratios": [3.2, wide]} if single else None,
        squeeze=False,
    )
    ax = axes[0][0]
    densities = sorted({float(d) for _, d in g if d})
    for m in bands:
        ms = ms_of(m, "")
        if ms and densities:
            ax.axhline(ms[0], color=colour[m], label=f"{m} (all densities)")
            lo, hi = min(densities) * 0.9, max(densities) * 1.1
            ax.fill_between([lo, hi], ms[0] - ms[1], ms[0] + ms[1], color=colour[m], alpha=0.15)
    for i, m in enumerate(swept):
        pts = [(float(d), ms_of(m, d)) for d in reversed(at[m])]
        nudge = 1 + 0.025 * (i - len(swept) / 2)  # side by side on the log axis
        ax.errorbar(
            [d * nudge for d, ms in pts if ms],
            [ms[0] for _, ms in pts if ms],
            yerr=[ms[1] for _, ms in pts if ms],
            label=m,
            **style(m),
        )
    ax.set_xscale("log")
    if densities:
        ax.set_xticks(densities, [f"{d:g}" for d in densities])
        ax.minorticks_off()
    ax.set(xlabel="target density (kept fraction of edges)", ylabel=f"{view.label} (final)")
    seeds = sorted({r.get("seed", "") for r in rows})
    ax.set_title(f"mean ± sd over seeds (up to {len(seeds)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if single:
        side = axes[0][1]
        for x, m in enumerate(single):
            d = at[m][0]
            ms = ms_of(m, d)
            if ms:
                side.errorbar([x], [ms[0]], yerr=[ms[1]], **style(m))
                side.annotate(f"n={len(g[(m, d)])}", (x, ms[0]), xytext=(4, -10),
                              textcoords="offset points", fontsize=6)  # fmt: skip
        for rival in ("magnitude", "random"):  # the rivals at each row's own density
            label: str | None = f"{rival} at the row's density"
            for x, m in enumerate(single):
                ms = ms_of(rival, at[m][0])
                if ms:
                    side.hlines(ms[0], x - 0.35, x + 0.35, color=colour[rival], linewidth=1.5,
                                linestyle=":", label=label)  # fmt: skip
                    label = None
        side.set_xticks(range(len(single)), [f"{m}\n@{at[m][0]}" for m in single])
        side.tick_params(axis="x", labelsize=7, rotation=60)
        side.set_xlim(-0.6, len(single) - 0.4)
        side.set_title("one density only", fontsize=9)
        side.grid(alpha=0.3, axis="y")
        if side.get_legend_handles_labels()[0]:
            side.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def marks(section: str) -> tuple[str, str]:
    """The HTML comments that fence a generated section in the README (invisible on GitHub)."""
    return f"<!-- bench/table.py {section} -->", f"<!-- /bench/table.py {section} -->"


def splice(readme: str, section: str, text: str) -> str:
    """``readme`` with the lines between ``section``'s two marks replaced by ``text``.

    Everything outside the marks (the prose, the commands, the reading) is kept byte for byte;
    a README without both marks, or with them twice, is refused (UserError: one line).
    """
    from bbem.errors import UserError

    start, end = marks(section)
    if readme.count(start) != 1 or readme.count(end) != 1:
        raise UserError(
            f"the README needs the marks {start} and {end} once each, around the section "
            "to replace: add them where the table goes"
        )
    head, rest = readme.split(start, 1)
    old, tail = rest.split(end, 1)
    if "\n" not in old:
        raise UserError(f"put {start} and {end} on lines of their own")
    return f"{head}{start}\n{text.rstrip(chr(10))}\n{end}{tail}"


def write_readme(path: Path, section: str, text: str) -> None:
    """Splice ``text`` into the README at ``path``: a temporary file, then a rename."""
    from bbem.atomic import atomic_output
    from bbem.errors import UserError

    try:
        old = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read the README {path}: {e.strerror}; --readme names it") from None
    new = splice(old, section, text)
    with atomic_output(path, overwrite=True, kind="text") as tmp:
        tmp.write_text(new)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("csv", nargs="+", help="result CSVs of bench/matrix.py")
    ap.add_argument("--md", default=None, help="also write the markdown here")
    ap.add_argument("--png", default=None, help="write the plot here")
    ap.add_argument("--title", default="BB against dense, magnitude and random")
    ap.add_argument(
        "--section",
        default=None,
        help="replace this section of --readme: the lines between its marks "
        "'<!-- bench/table.py SECTION -->' and '<!-- /bench/table.py SECTION -->' (no heading)",
    )
    ap.add_argument("--readme", default="README.md", help="the README --section edits")
    a = ap.parse_args(argv)
    from bbem.errors import UserError

    try:
        rows = read(a.csv)
        md = markdown(rows, a.title)
        print(md, end="")
        if a.md:  # never over a results CSV it reads
            from bbem.atomic import atomic_output

            with atomic_output(a.md, overwrite=True, kind="text", inputs=a.csv) as tmp:
                tmp.write_text(md)
        if a.section:
            write_readme(Path(a.readme), a.section, body(rows))
        if a.png:
            plot(rows, Path(a.png))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
