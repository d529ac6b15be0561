"""report (HTML + PNGs): non-finite figures, documents of another model or block partition, tiers as apply
writes them, an all-or-nothing folder, UTF-8, names drawn as text, malformed documents as one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tqs_onnx import SCHEMA_VERSION
from tqs_onnx import report
from tqs_onnx.cli import main
from tqs_onnx.demo import demo_files
from tqs_onnx.util import json_safe

HORIZON = 4


# ------------------------------------------------------------------------------------------ inputs

@pytest.fixture(scope="module")
def lorenz(tmp_path_factory) -> dict[str, Path]:
    """The bundled Lorenz-96 MLP swept with two block partitions (auto: 3 blocks, fixed:2), a plan from
    each, and an eval report of a 4x model; short horizon, 3 contexts, one Gaussian draw, one tier."""
    tmp = tmp_path_factory.mktemp("lorenz")
    f = demo_files()
    spec = json.loads(f["spec"].read_text())
    spec["horizon"] = HORIZON
    p = {"model": f["model"], "spec": tmp / "spec.json", "sweep": tmp / "sweep.npz", "eval": tmp / "eval.npz",
         "dir": tmp}
    p["spec"].write_text(json.dumps(spec))
    for key in ("sweep", "eval"):
        with np.load(f[key]) as z:
            np.savez(p[key], **{k: z[k][:3] for k in z.files})
    for name, blocks in (("scores", "auto"), ("scores2", "fixed:2")):
        p[name] = tmp / f"{name}.json"
        assert main(["sweep", str(p["model"]), "--rollout", str(p["spec"]), "--contexts", str(p["sweep"]),
                     "-o", str(p[name]), "--probes", "1", "--tiers", "int8", "--blocks", blocks, "--quiet"]) == 0
        p[f"plan_{name}"] = tmp / f"plan_{name}.json"
        assert main(["allocate", str(p[name]), "--compression", "3", "--objective", "paper", "--tiers",
                     "fp32,int8,int4", "-o", str(p[f"plan_{name}"]), "--quiet"]) == 0
    p["q4"] = tmp / "q4.onnx"
    assert main(["apply", str(p["model"]), str(p["plan_scores"]), "-o", str(p["q4"]), "--quiet"]) == 0
    p["evaljson"] = tmp / "eval.json"
    assert main(["eval", str(p["model"]), str(p["q4"]), "--rollout", str(p["spec"]), "--contexts", str(p["eval"]),
                 "-o", str(p["evaljson"]), "--quiet"]) == 0
    return p


def _scores_doc(names: list[str], gammas: list[float], sha: str = "a" * 64) -> dict:
    """A scores document of one weight per block, each read by a MatMul (what load_scores checks)."""
    weights = {f"w{i}": {"shape": [4, 4], "bits": 32, "consumer_ops": ["MatMul"]} for i in range(len(names))}
    blocks = [{"id": i, "name": n, "weights": [f"w{i}"], "size": 16, "quant": {"gamma_task": g, "a_max": 1.0},
               "gauss": None, "dead": False, "nonfinite": g == math.inf}
              for i, (n, g) in enumerate(zip(names, gammas))]
    return {"schema_version": SCHEMA_VERSION, "kind": "tqs-scores", "horizon": HORIZON, "contexts": 2,
            "model": {"path": "/models/m.onnx", "sha256": sha, "identity": "file+data", "file_bytes": 1000,
                      "fixed_bytes": 744, "quantizable_bytes": 256, "graph_bytes": 0},
            "config": {}, "weights": weights, "blocks": blocks}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _frontier_doc(scores: dict, tiers: list[str], blocks: bool = True) -> dict:
    """A frontier of one kept point at `tiers` (one per block), as pareto writes it (strict JSON)."""
    row = {"kind": "tqs", "target": 2.0, "objective": "measured", "tier": None, "tiers": tiers, "model": "m.2x.onnx",
           "mae_vs_fp32": 0.5, "rmse_vs_fp32": 0.7, "mae_vs_truth": 0.5, "mae_fp32_vs_truth": 0.0,
           "degradation_pct": None, "planned_compression": 2.0, "on_disk_compression": 2.0, "on_disk_bytes": 500,
           "seconds": 0.1, "kept": True, "pareto": True,
           "outputs": {"y": {"mae_vs_fp32": 0.5, "rmse_vs_fp32": 0.7, "mae_vs_fp32_per_step": [0.1, 0.5, 0.9],
                             "mae_vs_truth": 0.5, "mae_fp32_vs_truth": 0.0, "degradation_pct": None,
                             "finite": True}}}
    doc = {"schema_version": SCHEMA_VERSION, "kind": "tqs-frontier", "model": dict(scores["model"]),
           "eval_contexts": 2, "horizon": 3, "points": [row], "uniform": [], "notes": []}
    if blocks:
        doc["blocks"] = [{"id": b["id"], "name": b["name"], "size": b["size"]} for b in scores["blocks"]]
    return doc


def _report(*argv) -> int:
    return main(["report", *map(str, argv), "--quiet"])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture()
def drawn(monkeypatch) -> dict[str, object]:
    """The report's figures by file name, kept open to be inspected (report._save closes them)."""
    import matplotlib.pyplot as plt

    figures: dict[str, object] = {}

    def keep(fig, path):
        fig.savefig(path, format="png")
        figures[Path(path).name] = fig

    monkeypatch.setattr(report, "_save", keep)
    yield figures
    for fig in figures.values():
        plt.close(fig)


# ----------------------------------------------------------------------------- 1 diverged candidate

def test_report_of_a_diverged_candidate_shows_non_finite_values(lorenz, tmp_path, capsys):
    """eval writes strict JSON (NaN and inf as null): the report shows them as non-finite, with a finite
    column and a note, instead of a TypeError."""
    m = onnx.load(lorenz["model"])
    for t in m.graph.initializer:
        if t.name == "delta_scale":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1e38), t.name))
    bad = tmp_path / "diverged.onnx"
    onnx.save(m, bad)
    eval_path = tmp_path / "eval.json"
    assert main(["eval", str(lorenz["model"]), str(bad), "--rollout", str(lorenz["spec"]), "--contexts",
                 str(lorenz["eval"]), "-o", str(eval_path), "--quiet"]) == 0
    entry = json.loads(eval_path.read_text())["outputs"]["x_next"]
    assert entry["finite"] is False and None in entry["mae_vs_fp32_per_step"]  # the case in point
    out = tmp_path / "r"
    assert _report(lorenz["scores"], "--eval", eval_path, "-o", out) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    row = page[page.index('<td class="l">x_next</td>'):].split("</tr>")[0]
    assert "<td>no</td>" in row and row.count(report.NONFINITE) >= 3
    assert "the candidate diverged" in page and (out / "steps.png").stat().st_size > 1000


def test_a_curve_that_diverges_midway_stops_there():
    doc = {"compression": {"on_disk": 4.0}, "outputs": {"y": {"mae_vs_fp32_per_step": [0.1, 0.2, None, None]}}}
    (label, values, _), = report.step_curves(None, doc)
    assert values[:2] == [0.1, 0.2] and all(math.isnan(v) for v in values[2:])
    assert label.endswith(f"{report.NONFINITE} from step 3")


# ---------------------------------------------------------------------- 2 another block partition

def test_plans_and_frontiers_of_another_block_partition_are_refused(lorenz, tmp_path, capsys):
    """Scores of 3 blocks with the plan of a 2-block sweep of the same model, and the other way round,
    and a frontier of 2 blocks beside a plan of 3: one line each, not wrong tiers or a ragged tier map."""
    out = tmp_path / "r"
    for scores, plan in (("scores", "plan_scores2"), ("scores2", "plan_scores")):
        assert _report(lorenz[scores], "--plan", lorenz[plan], "-o", out) == 2
        assert "not the scores' blocks" in _one_line_error(capsys)
    two = json.loads(lorenz["scores2"].read_text())
    for blocks in (True, False):  # a frontier that lists its blocks, and an older one that does not
        frontier = _write(tmp_path / "frontier.json", _frontier_doc(two, ["int8", "fp32"], blocks=blocks))
        assert _report(lorenz["scores"], "--frontier", frontier, "--plan", lorenz["plan_scores"], "-o", out) == 2
        assert "blocks" in _one_line_error(capsys)
    assert not out.exists()
    assert _report(lorenz["scores2"], "--frontier", frontier, "--plan", lorenz["plan_scores2"], "-o", out) == 0


# --------------------------------------------------------------------------- 3 diverged probe ranking

def test_a_diverged_block_ranks_first_drawn_and_flagged(tmp_path, drawn):
    """gamma inf (the probe's rollout became non-finite) is the most sensitive block, as the sweep's own
    ranking has it: first in roles.png with a visible bar, marked in gamma.png, flagged in the table."""
    scores = _scores_doc(["calm", "blows_up", "mild", "still"], [0.2, math.inf, 0.5, -math.inf])
    report.write_report(tmp_path / "r", scores)
    left = drawn["roles.png"].axes[0]
    assert [t.get_text() for t in left.get_yticklabels()] == ["blows_up", "mild", "calm", "still"]
    first = left.patches[0]
    assert first.get_width() >= 0.5 and first.get_hatch()
    assert any(t.get_text().strip() == report.NONFINITE for t in left.texts)
    gamma_ax = drawn["gamma.png"].axes[0]
    assert any("non-finite" in h.get_label() for h in gamma_ax.collections)
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    row = page[page.index('<td class="l">blows_up</td>'):].split("</tr>")[0]
    assert f'<td class="bad">{report.NONFINITE}</td>' in row


# -------------------------------------------------------------------- 4, 5 documents of another model

def test_a_frontier_of_another_model_is_refused_beside_older_scores(tmp_path, capsys):
    """Scores from before the identity field: a frontier's digest of the other scheme is accepted only
    when the file size and blocks it records are the scores', and refused when it records neither."""
    old = _scores_doc(["a", "b"], [0.3, 0.2])
    del old["model"]["identity"]
    scores = _write(tmp_path / "old.json", old)
    frontier = _frontier_doc(old, ["int8", "fp32"])
    frontier["model"].update(sha256="b" * 64, identity="file+data")  # the same model's data-inclusive digest
    path = tmp_path / "f.json"
    assert _report(scores, "--frontier", _write(path, frontier), "-o", tmp_path / "r") == 0
    frontier["model"]["file_bytes"] = 2000
    assert _report(scores, "--frontier", _write(path, frontier), "-o", tmp_path / "r") == 2
    assert "another model" in _one_line_error(capsys)
    frontier["model"].pop("file_bytes")
    frontier["blocks"][0]["name"] = "other"
    assert _report(scores, "--frontier", _write(path, frontier), "-o", tmp_path / "r") == 2
    assert "another model" in _one_line_error(capsys)
    del frontier["blocks"]
    assert _report(scores, "--frontier", _write(path, frontier), "-o", tmp_path / "r") == 2
    assert "cannot tell" in _one_line_error(capsys)


def test_an_eval_of_another_model_is_refused(lorenz, tmp_path, capsys):
    """The eval report's reference_model must be the scores' model; an older eval without it, its
    reference's file name."""
    doc = json.loads(lorenz["evaljson"].read_text())
    assert _report(lorenz["scores"], "--eval", lorenz["evaljson"], "-o", tmp_path / "r") == 0
    other = dict(doc, reference_model={**doc["reference_model"], "sha256": "0" * 64})
    assert _report(lorenz["scores"], "--eval", _write(tmp_path / "e.json", other), "-o", tmp_path / "r") == 2
    assert "another model" in _one_line_error(capsys)
    older = {k: v for k, v in doc.items() if k != "reference_model"}
    assert _report(lorenz["scores"], "--eval", _write(tmp_path / "e.json", older), "-o", tmp_path / "r") == 0
    older["reference"] = str(Path(older["reference"]).with_name("another.onnx"))
    assert _report(lorenz["scores"], "--eval", _write(tmp_path / "e.json", older), "-o", tmp_path / "r") == 2
    assert "another.onnx" in _one_line_error(capsys)


# ------------------------------------------------------------------------- 6 tiers from the weights

def test_plan_tiers_are_the_tiers_apply_writes(lorenz, tmp_path):
    """apply writes plan["weights"]: the report shows those, every tier of a block whose weights differ."""
    scores = json.loads(lorenz["scores2"].read_text())
    plan = json.loads(lorenz["plan_scores2"].read_text())
    two = next(b for b in scores["blocks"] if len(b["weights"]) == 2)
    plan["weights"].update({two["weights"][0]: "int4", two["weights"][1]: "fp32"})
    plan["blocks"] = [dict(b, tier="int8") for b in plan["blocks"]]  # what apply ignores
    out = tmp_path / "r"
    assert _report(lorenz["scores2"], "--plan", _write(tmp_path / "p.json", plan), "-o", out) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    row = page[page.index(f'<td class="l">{two["name"]}</td>'):].split("</tr>")[0]
    assert row.endswith("<td>fp32 / int4</td>")
    assert report.tier_rows(scores, plan, None)[0][1][two["id"]] == "fp32 / int4"
    # the written form is no other tier: one colour on the map for what a frontier calls int8/channel
    plan["weights"].update({two["weights"][0]: "int8/channel/load", two["weights"][1]: "int8/channel"})
    assert report.tier_rows(scores, plan, None)[0][1][two["id"]] == "int8/channel"


# ---------------------------------------------------------------------------- 7 all or nothing

def test_a_report_that_fails_midway_leaves_the_earlier_one_whole(lorenz, tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert _report(lorenz["scores"], "--eval", lorenz["evaljson"], "-o", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "steps.png" in before

    def fails(*args):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_steps", fails)  # after gamma.png and roles.png are drawn
    with pytest.raises(RuntimeError):
        report.write_report(out, json.loads(lorenz["scores2"].read_text()), eval_doc=json.loads(
            lorenz["evaljson"].read_text()))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no staging folder left
    monkeypatch.undo()
    assert _report(lorenz["scores"], "-o", out) == 0  # a report without an eval: no earlier steps.png left
    assert sorted(p.name for p in out.iterdir()) == ["gamma.png", "index.html", "roles.png"]


# ------------------------------------------------------------------------------- 8 page encoding

def test_the_page_is_utf8_whatever_the_locale(tmp_path):
    scores = _write(tmp_path / "s.json", _scores_doc(["mödel/é", "ü"], [0.2, 0.1]))
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "tqs_onnx.cli", "report", str(scores), "-o", str(tmp_path / "r"),
                           "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mödel/é" in (tmp_path / "r" / "index.html").read_bytes().decode("utf-8")


# ----------------------------------------------------------------------------------- 9 mathtext

def test_dollars_in_names_are_drawn_as_they_are(tmp_path, drawn):
    """'a$x^{2}$b' is not a superscript and 'cost$_$' (invalid mathtext) is no parse error."""
    from matplotlib.cbook import is_math_text

    names = ["cost$_$", "a$x^{2}$b", "plain"]
    report.write_report(tmp_path / "r", _scores_doc(names, [0.3, 0.2, 0.1]))
    for fig in drawn.values():
        labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
        for name in names[:2]:
            shown = next((s for s in labels if s.replace(r"\$", "$") == name), None)
            if shown is not None:
                assert not is_math_text(shown)
    assert any(t.get_text().replace(r"\$", "$") == "cost$_$" for t in drawn["gamma.png"].axes[0].get_xticklabels())


# --------------------------------------------------------------------------- 10 infinite degradation

def test_infinite_degradation_is_inf_and_not_computed_is_a_dash(tmp_path):
    """An FP32 model that matches the truth exactly makes any error infinitely worse (eval prints +inf%);
    strict JSON has null for it, which is not 'not computed'."""
    entry = json_safe({"mae_vs_fp32": 0.4, "rmse_vs_fp32": 0.5, "mae_vs_fp32_per_step": [0.4], "finite": True,
                       "mae_vs_truth": 0.4, "mae_fp32_vs_truth": 0.0, "degradation_pct": math.inf})
    assert entry["degradation_pct"] is None
    no_truth = {k: entry[k] for k in ("mae_vs_fp32", "rmse_vs_fp32", "mae_vs_fp32_per_step", "finite")}
    table = report.eval_table({"outputs": {"y": entry, "z": no_truth}, "compression": {"on_disk": 2.0}})
    rows = table.split("</tr>")
    assert rows[1].endswith('<td class="bad">inf</td>') and rows[2].endswith("<td>-</td>")
    frontier = _frontier_doc(_scores_doc(["a"], [0.1]), ["int8"])
    assert '<td class="bad">inf</td>' in report.frontier_table(frontier)
    frontier["points"][0].update(mae_vs_truth=None, mae_fp32_vs_truth=None)
    for o in frontier["points"][0]["outputs"].values():
        for k in ("mae_vs_truth", "mae_fp32_vs_truth", "degradation_pct"):
            o.pop(k)
    assert "inf" not in report.frontier_table(frontier)


# ------------------------------------------------------------------------------------ 11 labels

def test_long_scoped_block_names_keep_their_distinguishing_tails():
    names = [f"model/decoder/layers.0/self_attn/{p}_proj" for p in "qkv"]
    labels = report.block_labels({"blocks": [{"id": i, "name": n} for i, n in enumerate(names)]})
    assert labels == [f"…layers.0/self_attn/{p}_proj" for p in "qkv"]
    assert all(len(label) <= report.LABEL_WIDTH for label in labels)
    same_tail = [{"id": 0, "name": "x" * 40 + "/q"}, {"id": 7, "name": "y" * 14 + "x" * 40 + "/q"}]
    labels = report.block_labels({"blocks": same_tail})
    assert len(set(labels)) == 2 and labels[1].endswith("#7")


# -------------------------------------------------------------------------------- 12 malformed

@pytest.mark.parametrize("flag, break_it", [
    ("--eval", lambda d: d.update(outputs=[])),
    ("--eval", lambda d: d["outputs"]["x_next"].update(mae_vs_fp32_per_step=["a"])),
    ("--eval", lambda d: d.update(compression={})),
    ("--plan", lambda d: d.pop("planned_compression")),
    ("--plan", lambda d: d["weights"].update({next(iter(d["weights"])): "int9"})),
    ("--plan", lambda d: d.update(blocks=[{"id": "0"}])),
    ("--frontier", lambda d: d["points"][0].pop("outputs")),
    ("--frontier", lambda d: d["points"][0].update(tiers=["int8", None, "fp32"])),
    ("--frontier", lambda d: d.update(points={})),
])
def test_malformed_documents_are_one_line_errors(lorenz, tmp_path, capsys, flag, break_it):
    scores = json.loads(lorenz["scores"].read_text())
    docs = {"--eval": lambda: json.loads(lorenz["evaljson"].read_text()),
            "--plan": lambda: json.loads(lorenz["plan_scores"].read_text()),
            "--frontier": lambda: _frontier_doc(scores, ["int8", "int8", "fp32"])}
    doc = docs[flag]()
    break_it(doc)
    assert _report(lorenz["scores"], flag, _write(tmp_path / "d.json", doc), "-o", tmp_path / "r") == 2
    assert "malformed" in _one_line_error(capsys)


def test_a_folder_with_a_page_or_plots_of_someone_else_is_not_taken_over(tmp_path, capsys):
    scores = _write(tmp_path / "s.json", _scores_doc(["a", "b"], [0.2, 0.1]))
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>my own page</html>")
    assert _report(scores, "-o", site) == 2 and "did not write" in _one_line_error(capsys)
    assert (site / "index.html").read_text() == "<html>my own page</html>"
    (site / "index.html").unlink()
    (site / "tiers.png").write_bytes(b"mine")
    assert _report(scores, "-o", site) == 2 and "tiers.png" in _one_line_error(capsys)
    assert (site / "tiers.png").read_bytes() == b"mine"
    (site / "tiers.png").unlink()
    assert _report(scores, "-o", site) == 0 and _report(scores, "-o", site) == 0  # its own page is replaced


def test_a_page_of_an_earlier_version_is_ours_and_pareto_checks_its_report_folder_first(tmp_path, capsys):
    scores = _write(tmp_path / "s.json", _scores_doc(["a", "b"], [0.2, 0.1]))
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                                     "<title>tqs-onnx report</title></head><body></body></html>")
    assert _report(scores, "-o", site) == 0  # a page without the generator tag, from before it
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "index.html").write_text("<html>mine</html>")
    rc = main(["pareto", "models/lorenz96_mlp.onnx", str(scores), "--rollout", "models/lorenz96_mlp.rollout.json",
               "--contexts", "models/lorenz96_sweep.npz", "--targets", "2:4", "-o", str(tmp_path / "front"),
               "--report", str(foreign)])
    assert rc == 2 and "did not write" in _one_line_error(capsys) and not (tmp_path / "front").exists()
