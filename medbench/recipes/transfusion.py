"""The Transfusion recipe (RZ19): random vs pre-trained vs Mean-Var vs transfusion-K, CBR vs ResNet-50.

``medbench transfusion --task T`` plans one run per (backbone, init, seed)
(plus, with ``--freeze``, pre-trained runs with frozen features), executes them
through the normal :class:`~medbench.run.runner.Runner` into the normal run store
(so completed runs are reused and every run folder is an ordinary run with
predictions, history and ``similarity.json``), then writes a report under
``<out>/transfusion/<task>/``:

* ``table1.csv``/``.md`` — like RZ19 Table 1: per backbone the parameter count
  in the paper's convention (conv/linear weights + biases, one input channel,
  no head, no normalisation layers) beside RZ19 Table 1's, the parameters of
  the network as run (no head, the task's channels), and the test headline
  metric per init (mean ± std over seeds);
* ``table2.csv``/``.md`` — like RZ19 Table 2: per-label test AUC, random init
  vs transfer (``pretrained``) per backbone, computed from the saved
  predictions; beside RZ19's ResNet-50 CheXpert numbers when the task's labels
  are CheXpert's five;
* ``similarity.csv``/``.md`` and ``similarity.png`` — per-layer similarity of
  the initial and the fine-tuned network (mean over seeds);
* ``convergence.png`` — the validation headline metric during training
  (``history.json``: ``val_step``/``val_metric``), mean over seeds;
* ``report.json`` (every number above, unrounded), ``report.md`` and a
  ``leaderboard.json`` of the recipe's runs.

Inits that read weights (``pretrained``, ``mean-var``, ``transfusion:K``) are
planned only for backbones whose weights are found (``--weights NAME=FILE``,
the local weights folder, the hub); the others are listed as skipped, with
the reason, in the console and in ``report.json``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medbench.errors import BackboneError, UsageError

if TYPE_CHECKING:
    import polars as pl

    from medbench.run.request import RunRequest
    from medbench.run.runner import RunOutcome
    from medbench.spec.catalog import Catalog
    from medbench.store import RunDir
    from medbench.train.finetune import EngineConfig

#: RZ19's comparison: ResNet-50 and the four CBR nets
DEFAULT_BACKBONES = ("resnet50", "cbr-large-t", "cbr-large-w", "cbr-small", "cbr-tiny")
DEFAULT_INITS = ("random", "pretrained", "mean-var", "transfusion:1", "transfusion:3")
TRANSFER_INIT = "pretrained"
RANDOM_INIT = "random"
#: RZ19 (CheXpert, test AUC %), ResNet-50: (random init, ImageNet transfer); ../shared/PROTOCOL.md
RZ19_CHEXPERT_RESNET50 = {
    "Atelectasis": (79.52, 79.76),
    "Cardiomegaly": (75.23, 74.93),
    "Consolidation": (85.49, 84.42),
    "Edema": (88.34, 88.89),
    "Pleural Effusion": (88.70, 88.07),
}
REPORT_DIR = "transfusion"


@dataclass(frozen=True)
class RecipeConfig:
    task: str
    backbones: tuple[str, ...] = DEFAULT_BACKBONES
    inits: tuple[str, ...] = DEFAULT_INITS
    #: explicit weights files per backbone (others: local weights folder / hub)
    weights: dict[str, Path] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    max_steps: int | None = None
    engine: "EngineConfig | None" = None
    #: extra pre-trained runs with frozen features, e.g. ("head",)
    freeze: tuple[str, ...] = ()
    similarity: str = "cka"


def split_list(text: str | None, default: tuple[str, ...], what: str) -> tuple[str, ...]:
    if text is None:
        return default
    items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not items:
        raise UsageError(f"expected a comma-separated list of {what}, got {text!r}", field=f"--{what}")
    return items


def parse_weights(values: list[str], backbones: tuple[str, ...]) -> dict[str, Path]:
    """``NAME=FILE`` per backbone; a bare ``FILE`` is allowed when one backbone is run."""
    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            if len(backbones) != 1:
                raise UsageError(f"expected NAME=FILE with several backbones, got {v!r}", field="--weights")
            name, path = backbones[0], v
        if name not in backbones:
            raise UsageError(f"weights for {name!r}, which is not among --backbones ({', '.join(backbones)})",
                             field="--weights")
        out[name] = Path(path).expanduser()
    return out


def plan_requests(cfg: RecipeConfig) -> tuple[list["RunRequest"], list[dict]]:
    """The recipe's run requests, and the (backbone, init) pairs skipped for lack of weights."""
    from medbench.analysis.similarity import parse_methods
    from medbench.backbones.init import needs_weights, parse_init, preflight
    from medbench.backbones.registry import get_backbone
    from medbench.run.request import RunRequest
    from medbench.train.finetune import EngineConfig
    from medbench.train.freeze import parse_freeze

    engine = cfg.engine or EngineConfig()
    similarity = ",".join(parse_methods(cfg.similarity)) or None
    for init in cfg.inits:
        parse_init(init)
    requests: list[RunRequest] = []
    skipped: list[dict] = []
    for name in cfg.backbones:
        backbone = get_backbone(name)
        weights: Path | None = None
        reason = None
        try:
            _, weights = preflight(backbone, TRANSFER_INIT, cfg.weights.get(name))
        except BackboneError as err:
            if name in cfg.weights:  # the user named a file: a broken one is an error, not a skip
                raise
            reason = str(err)
        plans: list[tuple[str, str | None]] = [(init, None) for init in cfg.inits]
        plans += [(TRANSFER_INIT, parse_freeze(f, backbone)) for f in cfg.freeze]
        for init, freeze in plans:
            scheme, _ = parse_init(init)
            if needs_weights(scheme) and weights is None:
                skipped.append({"backbone": name, "init": init, "freeze": freeze, "reason": reason})
                continue
            init, w = preflight(backbone, init, weights if needs_weights(scheme) else None)
            requests += [RunRequest(task=cfg.task, backbone=name, seed=s, init=init, weights=w,
                                    max_steps=cfg.max_steps, engine=engine, freeze=freeze, similarity=similarity)
                         for s in cfg.seeds]
    return requests, skipped


# ---------------------------------------------------------------------------------------------- report


def arm_name(init: str, variant: str | None) -> str:
    """Column name of one arm of the comparison: the init, plus the variant (``pretrained+freeze-head``)."""
    return f"{init}+{variant}" if variant else init


def convention_params(backbone_name: str) -> int:
    """Conv/linear weights + biases on one input channel, no head, no normalisation (RZ19 Table 1's count)."""
    import torch
    from torch import nn

    from medbench.backbones.registry import get_backbone

    with torch.device("meta"):
        model = get_backbone(backbone_name).build(num_classes=0, in_chans=1)
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in
               m.parameters(recurse=False))


def params_as_run(backbone_name: str, in_chans: int) -> int:
    import torch

    from medbench.backbones.registry import get_backbone

    with torch.device("meta"):
        model = get_backbone(backbone_name).build(num_classes=0, in_chans=in_chans)
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Run:
    backbone: str
    arm: str
    seed: int
    result: dict
    path: Path


def _collect(runs: list["RunDir"]) -> list[_Run]:
    out = []
    for run in runs:
        r = run.result()
        if r:
            out.append(_Run(r["backbone"], arm_name(r["init"], r.get("regime")), r["seed"], r, run.path))
    return out


def _summary(values: list[float | None]) -> dict:
    from medbench.board.summary import summarize

    return summarize(values)


def _fmt(s: dict | None, scale: float = 1.0) -> str:
    if not s or s.get("mean") is None:
        return "—"
    m = s["mean"] * scale
    return f"{m:.4f}" if s.get("std") is None else f"{m:.4f} ± {s['std'] * scale:.4f}"


def _per_label_auc(run_path: Path) -> dict[str, float | None]:
    """Test AUC per label from the run's saved predictions (checked against its result.json; one-vs-rest
    for multiclass)."""
    from medbench.scoring.classification import per_label_auc
    from medbench.store import RunDir
    from medbench.store.scores import load_predictions

    return per_label_auc(load_predictions(RunDir(run_path), "test", required=True))


def _arms_in_order(runs: list[_Run], inits: tuple[str, ...]) -> list[str]:
    present = list(dict.fromkeys(r.arm for r in runs))
    ordered = [a for a in inits if a in present]
    return ordered + [a for a in present if a not in ordered]


def _mean_curve(curves: list[tuple[list[int], list[float | None]]]) -> tuple[list[int], list[float | None]]:
    import numpy as np

    steps = sorted({s for st, _ in curves for s in st})
    means: list[float | None] = []
    for s in steps:
        vals = [v[st.index(s)] for st, v in curves if s in st and v[st.index(s)] is not None]
        means.append(float(np.mean(vals)) if vals else None)
    return steps, means


def build_report(task_name: str, runs: list["RunDir"], *, inits: tuple[str, ...], backbones: tuple[str, ...],
                 in_chans: int, skipped: list[dict]) -> dict[str, Any]:
    """Every number of the report from completed run folders (nothing is recomputed but per-label AUCs)."""
    from medbench.backbones.registry import get_backbone
    from medbench.store import HISTORY, RunDir

    collected = [r for r in _collect(runs) if r.result["task"] == task_name]
    arms = _arms_in_order(collected, inits)
    headline = collected[0].result["headline"]["metric"] if collected else None
    table1, table2, sim_rows = [], [], []
    convergence: dict[str, dict[str, Any]] = {}
    similarity: dict[str, dict[str, Any]] = {}
    labels: list[str] = []
    per_label: dict[tuple[str, str], dict[str, dict]] = {}
    for bb in backbones:
        mine = [r for r in collected if r.backbone == bb]
        backbone = get_backbone(bb)
        row: dict[str, Any] = {
            "backbone": bb,
            "params_rz19_convention": convention_params(bb),
            "params_rz19_table1": backbone.extra.get("paper_params"),
            "params_as_run": params_as_run(bb, in_chans),
        }
        for arm in arms:
            row[arm] = _summary([r.result["headline"]["value"] for r in sorted(mine, key=lambda r: r.seed)
                                 if r.arm == arm]) if any(r.arm == arm for r in mine) else None
        table1.append(row)
        curves: dict[str, Any] = {}
        sims: dict[str, Any] = {}
        for arm in arms:
            arm_runs = sorted((r for r in mine if r.arm == arm), key=lambda r: r.seed)
            if not arm_runs:
                continue
            hist = [RunDir(r.path).read_json(HISTORY) for r in arm_runs]  # checked against result.json
            steps, values = _mean_curve([(h["val_step"], h["val_metric"]) for h in hist])
            curves[arm] = {"step": steps, "val_metric": values, "seeds": [r.seed for r in arm_runs]}
            records = [RunDir(r.path).read_json("similarity.json") for r in arm_runs
                       if (r.path / "similarity.json").is_file()]
            if records:
                layer_names = [layer["name"] for layer in records[0]["layers"]]
                entry: dict[str, Any] = {"layers": layer_names}
                for method in records[0]["methods"]:
                    entry[method] = [_summary([rec["layers"][i].get(method) for rec in records])["mean"]
                                     for i in range(len(layer_names))]
                    sim_rows += [{"backbone": bb, "init": arm, "method": method, "layer_index": i, "layer": layer,
                                  "value": entry[method][i], "seeds": len(records)}
                                 for i, layer in enumerate(layer_names)]
                entry["seeds"] = len(records)
                sims[arm] = entry
            if arm in (RANDOM_INIT, TRANSFER_INIT):
                aucs = [_per_label_auc(r.path) for r in arm_runs]
                labels = labels or list(aucs[0])
                per_label[(bb, arm)] = {lab: _summary([a.get(lab) for a in aucs]) for lab in labels}
        convergence[bb] = curves
        similarity[bb] = sims
    reference = _rz19_reference(labels)
    for lab in labels:
        row = {"label": lab}
        for bb in backbones:
            for arm in (RANDOM_INIT, TRANSFER_INIT):
                if (bb, arm) in per_label:
                    row[f"{bb} {arm}"] = per_label[(bb, arm)][lab]
        if reference:
            row["RZ19 resnet50 random (CheXpert)"] = reference[lab][0]
            row["RZ19 resnet50 transfer (CheXpert)"] = reference[lab][1]
        table2.append(row)
    return {
        "task": task_name,
        "headline": headline,
        "arms": arms,
        "backbones": list(backbones),
        "runs": [str(r.path) for r in collected],
        "skipped": skipped,
        "table1": table1,
        "table2": table2,
        "similarity_table": sim_rows,
        "convergence": convergence,
        "similarity": similarity,
    }


def _rz19_reference(labels: list[str]) -> dict[str, tuple[float, float]] | None:
    lower = {lab.lower(): lab for lab in labels}
    if set(lower) != {k.lower() for k in RZ19_CHEXPERT_RESNET50}:
        return None
    return {lower[k.lower()]: (v[0] / 100, v[1] / 100) for k, v in RZ19_CHEXPERT_RESNET50.items()}


def similarity_markdown(report: dict) -> str:
    """One table per backbone: a row per (init, method), a column per layer."""
    parts = []
    for bb in report["backbones"]:
        sims = report["similarity"].get(bb) or {}
        if not sims:
            continue
        rows = []
        for arm, entry in sims.items():
            for method in ("cka", "svcca"):
                if method in entry:
                    rows.append({"init": arm, "method": method, "seeds": entry["seeds"],
                                 **dict(zip(entry["layers"], entry[method]))})
        parts.append(f"**{bb}**\n\n" + markdown_table(rows))
    return "\n".join(parts) if parts else "(no similarity recorded)\n"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return _fmt(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


#: column headers of the Markdown tables (the JSON/CSV keep the short keys)
HEADERS = {"params_rz19_convention": "params (RZ19 convention)", "params_rz19_table1": "RZ19 Table 1",
           "params_as_run": "params (as run)"}


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def flat_frame(rows: list[dict]) -> "pl.DataFrame":
    """Rows with mean±std cells flattened to ``<col>`` (mean) and ``<col> std`` columns, for CSV."""
    import polars as pl

    flat = []
    for r in rows:
        out: dict[str, Any] = {}
        for k, v in r.items():
            if isinstance(v, dict):
                out[k] = v.get("mean")
                out[f"{k} std"] = v.get("std")
                out[f"{k} n"] = v.get("n")
            else:
                out[k] = v
        flat.append(out)
    cols = list(dict.fromkeys(k for r in flat for k in r))
    return pl.DataFrame([{c: r.get(c) for c in cols} for r in flat], infer_schema_length=None)


def plot_convergence(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medbench.analysis.similarity import line_colors
    from medbench.utils import atomic_write_bytes

    panels = [bb for bb in report["backbones"] if report["convergence"].get(bb)]
    n = max(1, len(panels))
    colors = line_colors(report["arms"])
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.4), squeeze=False)
    for ax, bb in zip(axes[0], panels):
        for arm, curve in report["convergence"][bb].items():
            y = [float("nan") if v is None else v for v in curve["val_metric"]]
            ax.plot(curve["step"], y, marker=".", color=colors.get(arm), label=arm)
        ax.set_title(bb, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation {report['headline']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['task']}: convergence (mean over seeds)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_similarity(report: dict, path: Path) -> None:
    from medbench.analysis.similarity import plot_layers

    backbones = [bb for bb in report["backbones"] if report["similarity"].get(bb)]
    methods = [m for m in ("cka", "svcca")
               if any(m in e for bb in backbones for e in report["similarity"][bb].values())]
    panels = []
    for method in methods:  # a row per method, a column per backbone
        for bb in backbones:
            sims = report["similarity"][bb]
            panels.append({"title": f"{bb} · {method.upper()}", "layers": next(iter(sims.values()))["layers"],
                           "lines": {arm: e[method] for arm, e in sims.items() if method in e},
                           "ylabel": f"{method.upper()}: initial vs fine-tuned"})
    if panels:
        plot_layers(panels, path, ncols=len(backbones),
                    title=f"{report['task']}: similarity of the initial and the fine-tuned network per layer "
                          "(mean over seeds)")


def write_report(report: dict, folder: Path) -> dict[str, Path]:
    """Tables (CSV + Markdown), plots and report.json into ``folder``; returns the written files."""
    from medbench.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    sections = [f"# Transfusion study: {report['task']}\n",
                f"Test {report['headline']}, mean ± std over seeds; runs: {len(report['runs'])}.\n"]
    titles = {"table1": "Table 1: models, parameters and test performance (cf. RZ19 Table 1)",
              "table2": "Table 2: per-label test AUC, random init vs transfer (cf. RZ19 Table 2)",
              "similarity_table": "Similarity of the initial and the fine-tuned network per layer (mean over seeds)"}
    for key, title in titles.items():
        rows = report[key]
        name = "similarity" if key == "similarity_table" else key
        md = similarity_markdown(report) if key == "similarity_table" else markdown_table(rows)
        buf = io.BytesIO()
        flat_frame(rows).write_csv(buf) if rows else buf.write(b"")
        atomic_write_bytes(folder / f"{name}.csv", buf.getvalue())
        atomic_write_text(folder / f"{name}.md", md)
        files[name] = folder / f"{name}.md"
        sections += [f"## {title}\n", md]
    plot_convergence(report, folder / "convergence.png")
    files["convergence"] = folder / "convergence.png"
    if report["similarity_table"]:
        plot_similarity(report, folder / "similarity.png")
        files["similarity_plot"] = folder / "similarity.png"
        sections.append("![similarity](similarity.png)\n")
    sections.append("![convergence](convergence.png)\n")
    if report["skipped"]:
        sections.append("## Skipped (no pre-trained weights)\n")
        sections += [f"- {s['backbone']} {arm_name(s['init'], 'freeze-' + s['freeze'] if s['freeze'] else None)}: "
                     f"{s['reason']}\n" for s in report["skipped"]]
    atomic_write_text(folder / "report.md", "\n".join(sections))
    atomic_write_json(folder / "report.json", report)
    files["report"] = folder / "report.md"
    files["json"] = folder / "report.json"
    return files


def run_recipe(cfg: RecipeConfig, catalog: "Catalog", runner, out: Path) -> tuple[list["RunOutcome"], dict, dict]:
    """Plan, run (reusing complete runs), and report: (outcomes, report, written files)."""
    from medbench.board.aggregate import write_leaderboard

    task = catalog.task(cfg.task)
    requests, skipped = plan_requests(cfg)
    for s in skipped:
        runner.reporter.message(f"skipped {s['backbone']} --init {s['init']}"
                                f"{' --freeze ' + s['freeze'] if s['freeze'] else ''}: {s['reason']}")
    if not requests:
        raise UsageError("nothing to run: no backbone has weights for the chosen inits and 'random' is not among "
                         "them", field="--inits")
    outcomes = runner.run_all(requests)
    done = [o.run_dir for o in outcomes if o.status in ("ok", "skipped") and o.run_dir is not None]
    folder = Path(out) / REPORT_DIR / task.name
    write_leaderboard(done, folder / "leaderboard.json")
    report = build_report(task.name, done, inits=cfg.inits + tuple(f"{TRANSFER_INIT}+freeze-{f}" for f in
                                                                     _canonical_freezes(cfg)),
                          backbones=cfg.backbones, in_chans=task.spec.input.channels, skipped=skipped)
    files = write_report(report, folder)
    return outcomes, report, files


def _canonical_freezes(cfg: RecipeConfig) -> list[str]:
    from medbench.backbones.registry import get_backbone
    from medbench.train.freeze import parse_freeze

    out: list[str] = []
    for bb in cfg.backbones:
        for f in cfg.freeze:
            c = parse_freeze(f, get_backbone(bb))
            if c and c not in out:
                out.append(c)
    return out
