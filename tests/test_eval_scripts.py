"""Issue 12's evaluation scripts: oracle_masks.py's batched rows and compare_models.py's tables."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
VARIANTS = ("dm", "dm_concave", "asyndm", "asyndm_strong", "oracle")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "rows.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _row(prompt: str, seed: int, category: str, **verdicts) -> dict:
    return {"prompt": prompt, "seed": seed, "category": category,
            **{v: verdicts.get(v, False) for v in VARIANTS}}


def test_compare_models_differences_of_differences_and_shipping_check(tmp_path, capsys):
    cm = _load("compare_models")
    # model A: DM right on every single-object pair, AsynDM never; model B: both right on all
    a = [_row(f"p{i}", s, "single", dm=True) for i in range(4) for s in (0, 1)]
    b = [_row(f"p{i}", s, "single", dm=True, asyndm=True) for i in range(4) for s in (0, 1)]
    cm.main([str(_write(tmp_path / "a", a)), str(_write(tmp_path / "b", b)), "--names", "A", "B",
             "--out", str(tmp_path / "out.md")])
    text = capsys.readouterr().out
    assert text.strip() == (tmp_path / "out.md").read_text().strip()
    # AsynDM gains 0 over DM on B and -1 on A: difference of differences +1; dm_concave
    # loses 1 on both: 0
    row = next(x for x in text.splitlines() if x.startswith("| all | 8 | +0.000"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "+1.000 [+1.000, +1.000]" and cells[3] == "+0.000 [+0.000, +0.000]"
    assert "single objects 100.0% (needs >= 90 %)" in text and text.rstrip().endswith("passes.")


def test_compare_models_names_a_bad_file(tmp_path):
    cm = _load("compare_models")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "rows.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(SystemExit, match=r"rows.jsonl, line 1: not a result row"):
        cm.read_rows(tmp_path / "a")
    with pytest.raises(SystemExit, match="no rows"):
        cm.read_rows(tmp_path)


def test_oracle_rows_of_a_batch_are_each_seeds_own(tmp_path):
    """The variants of a prompt are drawn as one batch over its seeds; a seed's verdicts are
    those of its own batch-of-one run (same noise), and the oracle falls back to DM where DM
    drew nothing to point at."""
    from asyndm.loading import load_pipeline
    from asyndm.repair import RepairConfig
    from asyndm.shapes.suite import load_suite

    om = _load("oracle_masks")
    torch.set_num_threads(1)
    pipe = load_pipeline(None, progress=False)
    entry = next(e for e in load_suite("shapes") if e.category == "two")
    cfg = RepairConfig(steps=4)
    together = om._prompt_rows(pipe, entry, [3, 4], cfg, 0.7)
    alone = om._prompt_rows(pipe, entry, [4], cfg, 0.7)
    assert [r["seed"] for r in together] == [3, 4] and together[1] == alone[0]
    for r in together:
        assert set(VARIANTS) <= set(r) and r["subjects"] == 2 and 0 <= r["oracle_regions"] <= 2
