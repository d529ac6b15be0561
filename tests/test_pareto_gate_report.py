"""pareto (a whole frontier from one sweep), gate (CI pass/fail with JUnit XML), report (HTML + PNGs)."""

from __future__ import annotations

import csv
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest

from tqs_onnx.allocate import Allocation, build_problem, load_scores, plan_document
from tqs_onnx.cli import main
from tqs_onnx.demo import demo_files
from tqs_onnx.errors import TqsError
from tqs_onnx.gate import parse_percent
from tqs_onnx.graph import load_model
from tqs_onnx.pareto import parse_targets, target_grid
from tqs_onnx.rewrite import rewrite_model, save_model
from tqs_onnx.tiers import parse_tiers

HORIZON = 6
TIERS = "bf16,int8,int8/channel,int4,int4/channel,int2,int2/channel"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The bundled demo model with a short horizon and a quick sweep (4 contexts, 2 Gaussian draws)."""
    tmp = tmp_path_factory.mktemp("demo")
    f = demo_files()
    spec = json.loads(f["spec"].read_text())
    spec["horizon"] = HORIZON
    paths = {"model": f["model"], "spec": tmp / "spec.json", "sweep": tmp / "sweep.npz", "eval": tmp / "eval.npz",
             "scores": tmp / "scores.json", "dir": tmp}
    paths["spec"].write_text(json.dumps(spec))
    for key in ("sweep", "eval"):
        with np.load(f[key]) as z:
            np.savez(paths[key], **{k: z[k][:4] for k in z.files})
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["sweep"]),
                 "-o", str(paths["scores"]), "--probes", "2", "--tiers", TIERS, "--quiet"]) == 0
    return paths


@pytest.fixture(scope="module")
def frontier(demo) -> dict:
    out = demo["dir"] / "frontier"
    argv = ["pareto", str(demo["model"]), str(demo["scores"]), "--rollout", str(demo["spec"]),
            "--contexts", str(demo["sweep"]), "--eval-contexts", str(demo["eval"]), "--targets", "2:32",
            "--points", "16", "-o", str(out), "--report", str(demo["dir"] / "frontier-report"), "--quiet",
            "--max-rollouts", "10"]
    assert main(argv) == 0
    return {"dir": out, "doc": json.loads((out / "frontier.json").read_text())}


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code of a usage error that argparse raises as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def _argv_gate(demo, candidate, *extra) -> list[str]:
    return ["gate", str(demo["model"]), str(candidate), "--rollout", str(demo["spec"]),
            "--contexts", str(demo["eval"]), *extra]


def _write_uniform(demo, tier: str, out: Path) -> Path:
    """The demo model with every block at one tier."""
    scores = load_scores(demo["scores"])
    problem = build_problem(scores, parse_tiers(f"fp32,{tier}"), 1.0)
    plan = plan_document(scores, problem, Allocation([1] * len(problem.blocks), "uniform", tier))
    model, _ = rewrite_model(load_model(demo["model"]), plan)
    save_model(model, out)
    return out


# ------------------------------------------------------------------------------------------- pareto

def test_pareto_writes_a_whole_frontier(frontier):
    doc, out = frontier["doc"], frontier["dir"]
    assert doc["kind"] == "tqs-frontier" and doc["schema_version"] == 1
    points = doc["points"]
    assert len(points) >= 16
    for p in points:
        assert p["on_disk_compression"] == pytest.approx(p["planned_compression"], rel=0.005)
        assert p["on_disk_compression"] >= p["target"] * 0.999  # the budget holds on disk
        assert p["mae_vs_fp32"] >= 0 and p["mae_vs_truth"] is not None and p["seconds"] >= 0
        assert (out / p["model"]).is_file()
    sizes = [p["on_disk_bytes"] for p in sorted(points, key=lambda p: p["target"])]
    assert all(b <= a for a, b in zip(sizes, sizes[1:]))  # a tighter target never writes a larger file
    assert doc["achievable"][1] < 32 and any("clamped" in n for n in doc["notes"])
    assert max(p["target"] for p in points) <= doc["achievable"][1]


def test_pareto_evaluates_uniform_baselines_and_csv(frontier):
    doc, out = frontier["doc"], frontier["dir"]
    tiers = {u["tier"] for u in doc["uniform"]}
    assert {"int8", "int4", "int2"} <= tiers and "fp32" not in tiers
    for u in doc["uniform"]:
        assert u["on_disk_compression"] == pytest.approx(u["planned_compression"], rel=0.005)
        assert (out / u["model"]).is_file()
    assert any(r["pareto"] for r in doc["points"] + doc["uniform"])
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert len(rows) == len(doc["points"]) + len(doc["uniform"])
    assert {"target", "planned_compression", "on_disk_compression", "mae_vs_fp32", "rmse_vs_fp32",
            "mae_vs_truth", "seconds"} <= set(rows[0])


def test_no_gptq_uniform_baseline_where_no_weight_has_statistics(demo):
    """It would be the plain tier's model again, listed twice (a user's trial: weights behind a Cast)."""
    from tqs_onnx.pareto import uniform_baselines

    scores = load_scores(demo["scores"])
    tiers = parse_tiers("fp32,int4/channel,int4/channel/gptq")
    some = {**scores, "gptq_weights": [next(iter(scores["weights"]))]}
    assert "int4/channel/gptq" in uniform_baselines(some, tiers, 2.0)[1]
    none = {**scores, "gptq_weights": []}
    assert set(uniform_baselines(none, tiers, 2.0)[1]) == {"int4/channel"}


def test_pareto_both_objectives_keeps_one_model_per_target(demo, tmp_path):
    out = tmp_path / "both"
    assert main(["pareto", str(demo["model"]), str(demo["scores"]), "--rollout", str(demo["spec"]),
                 "--contexts", str(demo["sweep"]), "--targets", "3:6", "--points", "3", "--objective", "both",
                 "--no-uniform", "-o", str(out), "--quiet", "--max-rollouts", "5"]) == 0
    doc = json.loads((out / "frontier.json").read_text())
    assert doc["in_sample"] and len(doc["points"]) == 6
    for t in doc["targets"]:
        cands = [p for p in doc["points"] if p["target"] == t]
        assert sum(p["kept"] for p in cands) == 1
    kept = {p["model"] for p in doc["points"] if p["kept"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.onnx")}
    assert on_disk == kept  # dropped candidates are deleted


def test_pareto_rerun_into_the_same_folder_deletes_the_earlier_runs_models(demo, tmp_path, capsys):
    out = tmp_path / "again"
    base = ["pareto", str(demo["model"]), str(demo["scores"]), "--rollout", str(demo["spec"]),
            "--contexts", str(demo["sweep"]), "--no-uniform", "-o", str(out), "--max-rollouts", "3"]
    assert main([*base, "--targets", "3:4", "--points", "2", "--quiet"]) == 0
    first = {p["model"] for p in json.loads((out / "frontier.json").read_text())["points"] if p["model"]}
    (out / "mine.onnx").write_bytes(b"not listed by any frontier")  # a user's file: never touched
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"x")
    doc = json.loads((out / "frontier.json").read_text())  # an earlier frontier naming a file outside the folder
    doc["points"].append({**doc["points"][0], "model": "../outside.onnx"})
    (out / "vendor_keep.onnx").write_bytes(b"a file this tool never writes, listed by a forged frontier")
    doc["points"].append({**doc["points"][0], "model": "vendor_keep.onnx"})
    (out / "frontier.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main([*base, "--targets", "5:6", "--points", "2"]) == 0
    assert "deleted" in capsys.readouterr().out
    second = {p["model"] for p in json.loads((out / "frontier.json").read_text())["points"] if p["model"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.onnx")}
    assert first and not first & second
    assert on_disk == second | {"mine.onnx", "vendor_keep.onnx"} and outside.exists()


def test_pareto_rerun_never_deletes_its_input_or_another_models_frontier(demo, tmp_path):
    out = tmp_path / "shared"
    common = ["--rollout", str(demo["spec"]), "--contexts", str(demo["sweep"]), "--no-uniform", "-o", str(out),
              "--max-rollouts", "3", "--quiet", "--points", "2"]
    assert main(["pareto", str(demo["model"]), str(demo["scores"]), *common, "--targets", "1:1.01"]) == 0
    points = json.loads((out / "frontier.json").read_text())["points"]
    kept = out / min(points, key=lambda p: p["target"])["model"]
    assert load_model(kept).sha256 == load_model(demo["model"]).sha256  # at 1x the written file is the model
    # that kept model, listed by the frontier in the folder, is the next run's input: never deleted
    assert main(["pareto", str(kept), str(demo["scores"]), *common, "--targets", "2:2.1"]) == 0
    assert kept.is_file()
    second = {out / p["model"] for p in json.loads((out / "frontier.json").read_text())["points"] if p["model"]}
    # another model into the same folder: the frontier there is not its own, so nothing of it is deleted
    other = onnx.load(demo["model"])
    other.doc_string = "another model"
    onnx.save(other, tmp_path / "other.onnx")
    scores = tmp_path / "other.json"
    assert main(["sweep", str(tmp_path / "other.onnx"), "--rollout", str(demo["spec"]), "--contexts",
                 str(demo["sweep"]), "-o", str(scores), "--probes", "1", "--tiers", TIERS, "--quiet"]) == 0
    assert main(["pareto", str(tmp_path / "other.onnx"), str(scores), *common, "--targets", "3:3.1"]) == 0
    assert kept.is_file() and second and all(p.is_file() for p in second)


def test_step_curves_with_an_eval_report_keep_the_frontiers(frontier):
    from tqs_onnx.report import step_curves

    doc = frontier["doc"]
    eval_doc = {"compression": {"on_disk": 4.0}, "outputs": {"x_next": {"mae_vs_fp32_per_step": [0.1, 0.2]}}}
    alone, both = step_curves(doc, None), step_curves(doc, eval_doc)
    assert both[0][0].startswith("x_next") and both[1:] == alone and any(base for _, _, base in alone)


def test_target_grid_clamps_and_skips_duplicates():
    grid, notes = target_grid((2, 32), 16, (1.0, 10.0))
    assert len(grid) == 16 and grid[0] == 2 and grid[-1] == 10 and notes
    assert all(b > a for a, b in zip(grid, grid[1:]))
    grid, notes = target_grid((50, 60), 4, (1.0, 10.0))
    assert grid == [10.0] and any("duplicate" in n for n in notes)
    assert parse_targets("2:32") == (2.0, 32.0) and parse_targets("4") == (4.0, 4.0)
    with pytest.raises(TqsError):
        parse_targets("32:2")


def test_pareto_bad_input_exits_2(demo, tmp_path, capsys):
    base = ["pareto", str(demo["model"]), str(demo["scores"]), "--rollout", str(demo["spec"]),
            "--contexts", str(demo["sweep"]), "-o", str(tmp_path / "x"), "--quiet"]
    assert main(base[:2] + [str(tmp_path / "missing.json")] + base[3:]) == 2
    assert _exit_code(base + ["--targets", "abc"]) == 2
    assert _exit_code(base + ["--targets", "32:2"]) == 2
    assert not (tmp_path / "x").exists()


def test_pareto_and_report_never_write_over_their_inputs(demo, tmp_path, capsys):
    """A scores file named frontier.json in pareto's folder, or gamma.png in report's, is an input the
    run would replace: refused before any work (exit 2), the input unchanged."""
    for folder, name, argv in (
            ("p", "frontier.json", lambda s: ["pareto", str(demo["model"]), str(s), "--rollout", str(demo["spec"]),
                                             "--contexts", str(demo["sweep"]), "-o", str(tmp_path / "p"), "--quiet"]),
            ("q", "index.html", lambda s: ["pareto", str(demo["model"]), str(s), "--rollout", str(demo["spec"]),
                                          "--contexts", str(demo["sweep"]), "-o", str(tmp_path / "q0"),
                                          "--report", str(tmp_path / "q"), "--quiet"]),
            ("r", "gamma.png", lambda s: ["report", str(s), "-o", str(tmp_path / "r")])):
        (tmp_path / folder).mkdir()
        scores = tmp_path / folder / name
        shutil.copy(demo["scores"], scores)
        before = scores.read_bytes()
        assert main(argv(scores)) == 2
        assert "refusing to overwrite the input" in capsys.readouterr().err
        assert scores.read_bytes() == before


# --------------------------------------------------------------------------------------------- gate

def test_gate_passes_a_model_against_itself(demo, tmp_path, capsys):
    junit = tmp_path / "self.xml"
    assert main(_argv_gate(demo, demo["model"], "--max-degradation", "1%", "--junit", str(junit))) == 0
    out = capsys.readouterr().out
    assert out.startswith("tqs-onnx gate: PASS") and len(out.splitlines()) < 25
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) >= 5


def test_gate_fails_a_badly_quantized_model_with_junit(demo, tmp_path, capsys):
    bad = _write_uniform(demo, "int2", tmp_path / "bad.onnx")
    junit, report = tmp_path / "bad.xml", tmp_path / "bad.json"
    assert main(_argv_gate(demo, bad, "--max-degradation", "1", "--max-mae", "1e-3", "--min-compression", "2",
                           "--junit", str(junit), "-o", str(report), "--quiet")) == 1
    assert capsys.readouterr().out == ""
    root = ET.parse(junit).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert {"checker", "ort_load", "finite", "degradation[x_next]", "mae[x_next]", "min_compression"} <= set(cases)
    assert cases["degradation[x_next]"].find("failure") is not None
    assert cases["mae[x_next]"].find("failure") is not None
    assert cases["checker"].find("failure") is None and cases["min_compression"].find("failure") is None
    assert int(root.get("failures")) == 2
    doc = json.loads(report.read_text())
    assert doc["kind"] == "tqs-gate" and not doc["passed"] and set(doc["failed"]) == {"degradation[x_next]", "mae[x_next]"}


def test_gate_broken_candidate_fails_and_skips_the_rest(demo, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    junit = tmp_path / "junk.xml"
    assert main(_argv_gate(demo, junk, "--max-degradation", "1", "--junit", str(junit), "--quiet")) == 1
    root = ET.parse(junit).getroot()
    assert root.get("failures") == "1" and int(root.get("skipped")) >= 2


def test_gate_bad_input_exits_2(demo, tmp_path, capsys):
    assert main(_argv_gate(demo, tmp_path / "missing.onnx", "--max-degradation", "1")) == 2
    assert main(_argv_gate(demo, demo["model"])) == 2  # no threshold for the output: would pass vacuously
    assert "no error threshold" in capsys.readouterr().err
    assert _exit_code(_argv_gate(demo, demo["model"], "--max-degradation=-3%")) == 2
    assert _exit_code(_argv_gate(demo, demo["model"], "--max-degradation", "1", "--junit", str(tmp_path))) == 2
    # bad input with --junit: an error testcase, so CI shows the error rather than no results
    junit = tmp_path / "bad-input.xml"
    assert main(_argv_gate(demo, demo["model"], "--junit", str(junit))) == 2
    root = ET.parse(junit).getroot()
    assert root.get("errors") == "1" and root.get("tests") == "1"
    assert "no error threshold" in root.find("testsuite/testcase/error").get("message")


def test_percent_means_percent():
    assert parse_percent("1%") == parse_percent("1") == 1.0
    assert parse_percent("0.01") == 0.01 and parse_percent(" 2.5 % ") == 2.5
    for bad in ("x", "-1", "nan", "inf%"):
        with pytest.raises(TqsError):
            parse_percent(bad)


# ------------------------------------------------------------------------------------------- report

def test_report_writes_html_and_pngs(demo, frontier, tmp_path):
    plan_path, eval_path = tmp_path / "plan.json", tmp_path / "eval.json"
    assert main(["allocate", str(demo["scores"]), "--compression", "4", "-o", str(plan_path), "--quiet"]) == 0
    model = frontier["dir"] / next(p["model"] for p in frontier["doc"]["points"] if p["kept"])
    assert main(["eval", str(demo["model"]), str(model), "--rollout", str(demo["spec"]), "--contexts",
                 str(demo["eval"]), "-o", str(eval_path), "--quiet"]) == 0
    out = tmp_path / "report"
    assert main(["report", str(demo["scores"]), "--frontier", str(frontier["dir"] / "frontier.json"),
                 "--plan", str(plan_path), "--eval", str(eval_path), "-o", str(out), "--quiet"]) == 0
    page = (out / "index.html").read_text()
    pngs = ["gamma.png", "roles.png", "frontier.png", "steps.png", "tiers.png"]
    for png in pngs:
        assert (out / png).stat().st_size > 1000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{png}"' in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_pareto_report_option_and_screenshot(demo, frontier, tmp_path):
    out = demo["dir"] / "frontier-report"
    assert (out / "index.html").is_file() and (out / "frontier.png").stat().st_size > 1000
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium for the screenshot")
    import subprocess
    import sys

    tool = Path(__file__).parents[1] / "tools" / "screenshot_report.py"
    shot = tmp_path / "shot.png"
    subprocess.run([sys.executable, str(tool), str(out / "index.html"), str(shot)], check=True, timeout=120,
                   capture_output=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_wrong_documents(demo, tmp_path, capsys):
    wrong = tmp_path / "wrong.json"
    shutil.copy(demo["scores"], wrong)
    assert main(["report", str(demo["scores"]), "--frontier", str(wrong), "-o", str(tmp_path / "r")]) == 2
    assert "not a tqs-frontier document" in capsys.readouterr().err


def test_pareto_resumes_an_interrupted_run_from_its_checkpoint(demo, tmp_path, monkeypatch, capsys):
    """Each finished point is checkpointed: a run killed after two points resumes with --resume, redoes
    only the rest, and writes the same frontier as an uninterrupted run; without --resume it refuses."""
    import tqs_onnx.pareto as pareto

    def argv(out, *extra):
        return ["pareto", str(demo["model"]), str(demo["scores"]), "--rollout", str(demo["spec"]),
                "--contexts", str(demo["sweep"]), "--eval-contexts", str(demo["eval"]), "--targets", "2:16",
                "--points", "4", "-o", str(out), "--quiet", "--max-rollouts", "5", *extra]

    assert main(argv(tmp_path / "whole")) == 0
    whole = json.loads((tmp_path / "whole" / "frontier.json").read_text())
    real, calls = pareto.run_point, []

    def dies_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(pareto, "run_point", dies_after_two)
    assert main(argv(tmp_path / "cut")) == 130  # Ctrl-C: "interrupted"
    assert "run the same command with --resume" in capsys.readouterr().err
    ckpt = tmp_path / "cut" / "frontier.ckpt.jsonl"
    assert len(ckpt.read_text().splitlines()) == 3  # fingerprint + two points
    assert main(argv(tmp_path / "cut")) == 2 and "--resume" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(pareto, "run_point", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert main(argv(tmp_path / "cut", "--resume")) == 0
    assert len(calls) == len(whole["points"]) - 2 and not ckpt.exists()
    cut = json.loads((tmp_path / "cut" / "frontier.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(cut["points"]) == strip(whole["points"]) and strip(cut["uniform"]) == strip(whole["uniform"])
    assert any("checkpoint" in n for n in cut["notes"])
    for r in cut["points"] + cut["uniform"]:
        assert r["model"] is None or (tmp_path / "cut" / r["model"]).is_file()


def test_scores_and_plans_of_other_graph_passes_are_refused(demo, tmp_path, capsys):
    """Sizes in scores and plans are those of the graph the passes prepared: a file from a version with
    other passes is refused (re-run the sweep), a plan unless --force; report still plots old scores."""
    doc = json.loads(demo["scores"].read_text())
    doc["passes"] = "inline,sparse,lift,factor,dedup16"
    old = tmp_path / "old-scores.json"
    old.write_text(json.dumps(doc))
    assert main(["allocate", str(old), "--compression", "2", "-o", str(tmp_path / "p.json"), "--quiet"]) == 2
    assert "re-run the sweep" in capsys.readouterr().err
    assert main(["report", str(old), "-o", str(tmp_path / "r")]) == 0
    assert main(["allocate", str(demo["scores"]), "--compression", "2", "-o", str(tmp_path / "p.json"),
                 "--quiet"]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    plan["passes"] = None
    (tmp_path / "old-plan.json").write_text(json.dumps(plan))
    argv = ["apply", str(demo["model"]), str(tmp_path / "old-plan.json"), "-o", str(tmp_path / "q.onnx"), "--quiet"]
    assert main(argv) == 2 and "re-run the sweep" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0


def test_a_checkpointed_model_is_identified_with_its_external_data(tmp_path):
    """Resuming re-uses a written model only if its .onnx and its .onnx.data are the bytes measured:
    external data altered to the same size no longer passes."""
    from tqs_onnx.pareto import _model_digest

    model = tmp_path / "m.onnx"
    model.write_bytes(b"graph")
    alone = _model_digest(model)
    Path(f"{model}.data").write_bytes(b"\x00" * 64)
    with_data = _model_digest(model)
    Path(f"{model}.data").write_bytes(b"\x01" * 64)
    assert len({alone, with_data, _model_digest(model)}) == 3


def test_pareto_keeps_the_earlier_frontier_when_a_new_run_fails_and_cleans_up_after_a_resumed_one(
        demo, tmp_path, monkeypatch, capsys):
    """A fresh run that fails before writing a model leaves the earlier frontier.json; one interrupted
    after its first model (frontier.json removed then) carries the earlier run's models in its
    checkpoint, so --resume still removes them."""
    import tqs_onnx.pareto as pareto

    out = tmp_path / "f"
    base = ["pareto", str(demo["model"]), str(demo["scores"]), "--rollout", str(demo["spec"]),
            "--contexts", str(demo["sweep"]), "--no-uniform", "-o", str(out), "--max-rollouts", "3", "--quiet"]
    assert main([*base, "--targets", "3:4", "--points", "2"]) == 0
    first = {p["model"] for p in json.loads((out / "frontier.json").read_text())["points"] if p["model"]}
    bad = tmp_path / "bad.npz"
    np.savez(bad, x0=np.zeros((2, 3), np.float32))
    assert main([*base, "--targets", "5:6", "--points", "2", "--eval-contexts", str(bad)]) == 2
    assert (out / "frontier.json").is_file()
    real, calls = pareto.run_point, []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pareto, "run_point", dies_after_one)
    assert main([*base, "--targets", "5:6", "--points", "2"]) == 130
    assert not (out / "frontier.json").exists() and all((out / m).is_file() for m in first)
    monkeypatch.setattr(pareto, "run_point", real)
    capsys.readouterr()
    assert main([*base, "--targets", "5:6", "--points", "2", "--resume"]) == 0
    second = {p["model"] for p in json.loads((out / "frontier.json").read_text())["points"] if p["model"]}
    assert {str(p.relative_to(out)) for p in out.rglob("*.onnx")} == second and not first & second


def test_report_refuses_a_plan_of_another_model_also_beside_older_scores(demo, tmp_path, capsys):
    """Scores from before the identity covered external data (no `identity` field) are still checked:
    a plan whose digest differs and whose weights are not the scores' is another model's."""
    old = json.loads(demo["scores"].read_text())
    del old["model"]["identity"]
    scores = tmp_path / "old.json"
    scores.write_text(json.dumps(old))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {"sha256": "0" * 64, "identity": "file+data"},
                                "blocks": [], "weights": {"not_this_models": "int8"}}))
    assert main(["report", str(scores), "--plan", str(plan), "-o", str(tmp_path / "r"), "--quiet"]) == 2
    assert "another model" in capsys.readouterr().err


def test_gate_against_truth_the_reference_matches_exactly_fails_any_error(demo, tmp_path, capsys):
    """Truth made from the reference's own rollout: its error is 0, so any candidate error is infinitely
    worse, never +0%."""
    from tqs_onnx.evaluate import rollouts
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device

    spec = RolloutSpec.load(demo["spec"])
    golden = rollouts(demo["model"], spec, Contexts.load(demo["eval"], spec), resolve_device("cpu"))["x_next"]
    data = dict(np.load(demo["eval"]))
    data["truth"] = golden
    ctx = tmp_path / "golden.npz"
    np.savez(ctx, **data)
    bad = _write_uniform(demo, "int2", tmp_path / "bad.onnx")
    argv = ["gate", str(demo["model"]), "{}", "--rollout", str(demo["spec"]), "--contexts", str(ctx),
            "--max-degradation", "1%", "--quiet"]
    report = tmp_path / "g.json"
    assert main([a.replace("{}", str(bad)) for a in argv] + ["-o", str(report)]) == 1
    strict = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert "degradation[x_next]" in strict["failed"]
    assert main([a.replace("{}", str(demo["model"])) for a in argv]) == 0


def test_gate_fails_a_candidate_whose_outputs_have_another_shape(demo, tmp_path, capsys):
    """Fixed dimensions must agree: a wider output would be broadcast against the reference's, an extra
    axis would not compare at all; both are a failed io_signature, never a pass or a traceback."""
    for extra_axis in (False, True):
        m = onnx.load(str(demo["model"]))
        out = m.graph.output[0]
        name = out.name
        m.graph.node[-1].output[0] = f"{name}_inner"
        if extra_axis:
            axes = onnx.helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [0])
            m.graph.initializer.append(axes)
            m.graph.node.append(onnx.helper.make_node("Unsqueeze", [f"{name}_inner", "axes"], [name]))
        else:
            m.graph.node.append(onnx.helper.make_node("Concat", [f"{name}_inner", f"{name}_inner"], [name], axis=0))
        dims = out.type.tensor_type.shape.dim
        if extra_axis:
            dims.add()
        for d in dims:  # symbolic: only the run shows the difference (or the rank does)
            d.dim_param = "n"
        path = tmp_path / f"shape{int(extra_axis)}.onnx"
        onnx.save(m, path)
        junit = tmp_path / f"shape{int(extra_axis)}.xml"
        capsys.readouterr()
        rc = main(_argv_gate(demo, path, "--max-degradation", "1000%", "--junit", str(junit), "--quiet"))
        assert rc == 1 and "Traceback" not in capsys.readouterr().err
        cases = [c for c in ET.parse(junit).getroot().iter("testcase") if c.get("name") == "io_signature"]
        assert len(cases) == 1 and cases[0].find("failure") is not None  # one testcase per check, always


def test_gate_bad_input_leaves_no_earlier_verdict_and_outputs_must_differ(demo, tmp_path, capsys):
    junit, report = tmp_path / "g.xml", tmp_path / "g.json"
    assert main(_argv_gate(demo, demo["model"], "--max-degradation", "1%", "--junit", str(junit), "-o",
                           str(report), "--quiet")) == 0
    assert junit.exists() and report.exists()
    assert main(_argv_gate(demo, demo["model"], "--max-degradation", "1%", "--junit", str(junit), "-o",
                           str(report), "--contexts", str(tmp_path / "missing.npz"), "--quiet")) == 2
    assert not report.exists()  # the earlier verdict is gone; the JUnit file now carries the error
    assert ET.parse(junit).getroot().get("errors") == "1" and "missing.npz" in junit.read_text()
    assert main(_argv_gate(demo, demo["model"], "--max-degradation", "1%", "--junit", str(junit), "-o",
                           str(junit))) == 2
    assert "must be two files" in capsys.readouterr().err


def test_gate_degradation_without_truth_is_bad_input(demo, tmp_path, capsys):
    data = {k: v for k, v in np.load(demo["eval"]).items() if k != "truth"}
    ctx = tmp_path / "notruth.npz"
    np.savez(ctx, **data)
    argv = ["gate", str(demo["model"]), str(demo["model"]), "--rollout", str(demo["spec"]), "--contexts", str(ctx),
            "--max-degradation", "1%", "--max-mae", "1"]
    assert main(argv) == 2 and "needs ground truth" in capsys.readouterr().err


def test_junit_holds_no_character_xml_cannot_carry():
    from tqs_onnx.gate import junit_xml

    doc = {"checks": [{"name": "io_signature", "status": "fail", "message": "output 'y\x01': missing",
                       "seconds": 0.0}], "seconds": 0.0, "reference": "r.onnx", "candidate": "c\x02.onnx",
           "reference_bytes": 1, "candidate_bytes": 1, "contexts": 1, "horizon": 1, "device": "cpu"}
    root = ET.fromstring(junit_xml(doc))
    assert root.find("testsuite/testcase/failure") is not None


def test_a_fresh_pareto_run_removes_models_an_interrupted_run_listed_nowhere(demo, tmp_path):
    """Killed, its checkpoint deleted as the refusal says, a new run left the killed run's models (listed
    only in that checkpoint) beside its own; models named as pareto names this model's go now, any other
    file stays."""
    out = tmp_path / "f"
    (out / "uniform").mkdir(parents=True)
    stem = demo["model"].name.removesuffix(".onnx")
    leftovers = [out / f"{stem}.9.125x.measured.onnx", out / "uniform" / f"{stem}.uniform-int1.onnx"]
    others = [out / "notes.onnx", out / "other.2.000x.measured.onnx"]
    for p in leftovers + others:
        shutil.copy(demo["model"], p)
    assert main(["pareto", str(demo["model"]), str(demo["scores"]), "--rollout", str(demo["spec"]), "--contexts",
                 str(demo["sweep"]), "--targets", "4", "--no-uniform", "-o", str(out), "--quiet",
                 "--max-rollouts", "2"]) == 0
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in others)
    doc = json.loads((out / "frontier.json").read_text())
    assert len(doc["points"]) == 1 and not any("duplicate" in n for n in doc["notes"])


def test_gate_fails_a_candidate_whose_unfollowed_output_is_nan(tmp_path, capsys):
    """A diagnostic output no spec follows, NaN on every call, passed as 'all finite' (a CI trial)."""
    from onnx import TensorProto, helper, numpy_helper

    def model(scale: float) -> onnx.ModelProto:
        w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32) / 4, "W")
        s = numpy_helper.from_array(np.array(scale, np.float32), "s")
        nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["x_next"]),
                 helper.make_node("ReduceSum", ["x_next"], ["e"], keepdims=0), helper.make_node("Mul", ["e", "s"], ["energy"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, 16]),
                               helper.make_tensor_value_info("energy", TensorProto.FLOAT, [])], [w, s])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        return m

    onnx.save(model(1000.0), tmp_path / "ref.onnx")
    onnx.save(model(float("nan")), tmp_path / "cand.onnx")
    (tmp_path / "spec.json").write_text(json.dumps({"horizon": 5, "feedback": {"x_next": "x"}}))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((3, 1, 16)).astype(np.float32))
    argv = ["gate", str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"), "--rollout", str(tmp_path / "spec.json"),
            "--contexts", str(tmp_path / "c.npz"), "--max-mae", "1"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "15 non-finite values in the rollout ('energy' 15 from step 1)" in out
    assert main([*argv[:2], str(tmp_path / "ref.onnx"), *argv[3:]]) == 0
    assert "every output finite" in capsys.readouterr().out
    # The candidate against itself: the failure says the reference is non-finite there too.
    assert main([argv[0], str(tmp_path / "cand.onnx"), *argv[2:]]) == 1
    assert "the reference's own 'energy' is non-finite too" in capsys.readouterr().out


def test_the_frontier_degradation_follows_the_maes_beside_it_and_the_worst_output_is_kept():
    """Two outputs of different scales: the row said +0.94% (the mean of +3.29% and -1.41%) beside mean
    MAEs 1.4% better than FP32's; a gate threshold taken from it then failed on the first output."""
    from tqs_onnx.pareto import error_summary

    outputs = {"x_next": {"mae_vs_fp32": 0.01, "rmse_vs_fp32": 0.02, "mae_vs_truth": 1.03288,
                          "mae_fp32_vs_truth": 1.0, "degradation_pct": 3.288},
               "energy": {"mae_vs_fp32": 300.0, "rmse_vs_fp32": 400.0, "mae_vs_truth": 980.62,
                          "mae_fp32_vs_truth": 994.64, "degradation_pct": -1.41}}
    row = error_summary(outputs)
    assert row["degradation_pct"] == pytest.approx(100 * (row["mae_vs_truth"] / row["mae_fp32_vs_truth"] - 1))
    assert row["degradation_pct"] < 0 and row["worst_degradation_pct"] == pytest.approx(3.288)


def test_a_gate_refused_for_a_malformed_option_replaces_its_earlier_verdict(demo, tmp_path, capsys):
    """A green JUnit of the last build stood beside a job that failed on a malformed option."""
    junit, report = tmp_path / "g.xml", tmp_path / "g.json"
    assert main(_argv_gate(demo, demo["model"], "--max-mae", "1", "--junit", str(junit), "-o", str(report),
                           "--quiet")) == 0
    assert 'failures="0"' in junit.read_text() and report.exists()
    assert main(_argv_gate(demo, demo["model"], "--max-mae", "1", "--max-size", "3k", "--junit", str(junit),
                           "-o", str(report))) == 2
    root = ET.parse(junit).getroot()
    assert root.get("errors") == "1" and "--max-size" in root.find(".//error").get("message")
    assert not report.exists()
    # An input named as --junit by mistake is never written over.
    model = tmp_path / "m.onnx"
    shutil.copy(demo["model"], model)
    before = model.read_bytes()
    assert main(_argv_gate(demo, model, "--max-mae", "x", "--junit", str(model))) == 2
    assert model.read_bytes() == before


def test_gate_max_mae_per_output(tmp_path, capsys):
    """Outputs of other scales (a state near 1, an energy near 1e3) could not be gated on one absolute
    MAE; OUTPUT=X bounds one output, a bare X the rest."""
    from onnx import TensorProto, helper, numpy_helper

    def model(seed: int) -> onnx.ModelProto:
        r = np.random.default_rng(0)
        w = r.standard_normal((16, 16)).astype(np.float32) / 4
        w += np.random.default_rng(seed).standard_normal((16, 16)).astype(np.float32) * 1e-2 * seed
        nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["x_next"]),
                 helper.make_node("ReduceSum", ["x_next"], ["e"], keepdims=1), helper.make_node("Mul", ["e", "s"], ["energy"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, 16]),
                               helper.make_tensor_value_info("energy", TensorProto.FLOAT, [1, 1])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(1000, np.float32), "s")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        return m

    onnx.save(model(0), tmp_path / "ref.onnx")
    onnx.save(model(1), tmp_path / "cand.onnx")
    (tmp_path / "spec.json").write_text(json.dumps({"horizon": 4, "feedback": {"x_next": "x"},
                                                    "trajectory": ["x_next", "energy"]}))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((3, 1, 16)).astype(np.float32))
    base = ["gate", str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"), "--rollout", str(tmp_path / "spec.json"),
            "--contexts", str(tmp_path / "c.npz"), "--quiet", "-o", str(tmp_path / "g.json")]
    assert main([*base, "--max-mae", "0.5"]) == 1
    assert json.loads((tmp_path / "g.json").read_text())["failed"] == ["mae[energy]"]
    assert main([*base, "--max-mae", "0.5", "--max-mae", "energy=500"]) == 0
    assert main([*base, "--max-mae", "energy=500"]) == 2  # x_next has no threshold left
    assert "no error threshold applies to output 'x_next'" in capsys.readouterr().err
    assert main([*base, "--max-mae", "0.5", "--max-mae", "enrgy=500"]) == 2
    assert "no trajectory output 'enrgy'" in capsys.readouterr().err
    assert main([*base, "--max-mae", "energy=lots"]) == 2
    assert main([*base, "--max-mae", "0.5", "--max-mae", "energy=500", "--max-mae", "energy=400"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_gate_names_the_first_non_finite_step_over_every_context(tmp_path, capsys):
    """An output no spec follows turns NaN at step 3 on context 1 and at step 6 on context 0: the gate
    said step 6 (context 0's, taken for all)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Add", ["x", "one"], ["x_next"]), helper.make_node("Sub", ["five", "x_next"], ["d"]),
             helper.make_node("Sqrt", ["d"], ["diag"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                          [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, 1]),
                           helper.make_tensor_value_info("diag", TensorProto.FLOAT, [1, 1])],
                          [numpy_helper.from_array(np.array(1, np.float32), "one"),
                           numpy_helper.from_array(np.array(5.5, np.float32), "five")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    (tmp_path / "spec.json").write_text(json.dumps({"horizon": 8, "feedback": {"x_next": "x"}}))
    np.savez(tmp_path / "c.npz", x=np.array([[[0.0]], [[3.0]]], np.float32))
    assert main(["gate", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--rollout", str(tmp_path / "spec.json"),
                 "--contexts", str(tmp_path / "c.npz"), "--max-mae", "1"]) == 1
    assert "('diag' 9 from step 3; the reference's own 'diag' is non-finite too)" in capsys.readouterr().out  # 3 + 6


def test_a_gate_usage_error_names_the_candidate_whatever_the_option_order(demo, tmp_path):
    junit = tmp_path / "g.xml"
    cand = tmp_path / "cand.onnx"
    shutil.copy(demo["model"], cand)
    assert main(["gate", "--junit", str(junit), str(demo["model"]), str(cand), "--rollout", str(demo["spec"]),
                 "--contexts", str(demo["eval"]), "--max-mae", "abc"]) == 2
    case = ET.parse(junit).getroot().find(".//testcase")
    assert case.get("classname") == f"tqs_onnx.gate[{cand}]"
