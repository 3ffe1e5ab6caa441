"""The main job (`maskloom demo`) end to end on tiny data: every stage runs and the report is complete."""

import json
import os

from PIL import Image

from maskloom.cli import main


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    tiny = ["demo", "--out", str(out), "--per-class", "3", "--steps", "4", "--minutes", "2", "--no-progress"]
    tiny += ["--set", "optim.batch_size=4"]
    code = main(tiny)
    assert code == 0
    printed = capsys.readouterr().out
    assert "[5/5] report:" in printed and "demo finished in" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["step"] == 4 and summary["train"]["status"] == "finished"
    assert set(summary["tables"]) == {
        "image",
        "video",
        "audio",
        "point_cloud",
        "graph",
        "time_series",
        "text",
        "forecast",
    }
    assert summary["wins"]["total"] == 7  # every modality of the demo is labelled and probed

    results = json.loads((out / "eval.json").read_text())
    kinds = sorted(r["kind"] for r in results["tables"].values())
    assert kinds == ["classification"] * 7 + ["forecast"]

    report = (out / "report.md").read_text()
    for section in (
        "## Token tables",
        "## Pretraining",
        "## Linear probe and kNN accuracy",
        "## Forecasting",
        "## Reconstructions",
    ):
        assert section in report
    pictures = [line.split("(", 1)[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert any(p.endswith("loss.png") for p in pictures)
    assert len(pictures) >= 1 + 7  # the loss curves and at least one picture per modality
    for p in pictures:
        with Image.open(os.path.join(out, p)) as im:
            assert im.size[0] > 50 and im.size[1] > 50

    # a rerun (as `make demo` twice) keeps the finished tables (exactly-once preprocessing) and
    # resumes the finished run
    code = main(tiny)
    assert code == 0
    rerun = capsys.readouterr().out
    assert printed.count("already") == 0 and "already finished" in rerun
    last = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert f"already trained: step 4/4, final loss {last:.4f}" in rerun and "nan" not in rerun

    # another recipe (here: more steps) never mixes into that run: one line, exit code 2
    code = main([*tiny, "--steps", "5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "recipe.toml: the run was trained with another recipe" in err

    # a table left by another maskloom version (its tokenizer's config changed) is rebuilt, and the
    # run trained on the tables before is moved aside, not resumed on other tables
    manifest = out / "tables" / "image" / "_manifest.json"
    m = json.loads(manifest.read_text())
    m["meta"]["fingerprint"] = "0" * 16
    manifest.write_text(json.dumps(m))
    code = main(tiny)
    assert code == 0
    again = capsys.readouterr().out
    assert "image: built by another config or maskloom version; rebuilding it" in again
    assert f"moved to {out / 'run.old'}, training afresh" in again
    assert (out / "run.old" / "metrics.jsonl").exists() and (out / "run" / "metrics.jsonl").exists()
    assert json.loads(manifest.read_text())["meta"]["fingerprint"] != "0" * 16


def test_demo_rejects_bad_arguments(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f")]) == 2  # before any work
    err = capsys.readouterr().err
    assert (
        err
        == f"maskloom demo: error: {tmp_path / 'f'}: exists and is not a directory; choose another --out\n"
    )
    assert main(["demo", "--per-class", "1"]) == 2
    assert "error: --per-class must be >= 2" in capsys.readouterr().err
    assert main(["demo", "--set", "nope.key=1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_wins_count_strictly_better_by_each_probe():
    from maskloom.commands.demo import _wins

    def table(m, lin, rlin, knn, rknn):
        return {
            "modality": m,
            "kind": "classification",
            "probes": {
                "pretrained": {"linear": lin, "knn": knn},
                "random_init": {"linear": rlin, "knn": rknn},
            },
        }

    results = {
        "tables": {
            "a": table("image", 0.6, 0.5, 0.4, 0.4),  # linear win, kNN tie
            "b": table("video", 0.5, 0.5, 0.3, 0.2),  # linear tie, kNN win
            "c": table("audio", 0.4, 0.5, 0.1, 0.2),  # both lose
            "f": {"modality": "time_series", "kind": "forecast"},  # not counted
        }
    }
    assert _wins(results) == {
        "wins": 1,
        "total": 3,
        "won": ["image"],
        "knn_wins": 1,
        "knn_won": ["video"],
    }
