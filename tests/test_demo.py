"""`lumos demo` end to end on a small setting: a self-contained report that shows the methods."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from lumos.cli import app


def test_demo_writes_a_self_contained_report(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--out",
            str(out),
            "--n-images",
            "2",
            "--methods",
            "saliency,integrated_gradients,grad_cam",
        ],
    )
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert str((out / "index.html").resolve()) in result.output
    for name in ("saliency", "integrated_gradients", "grad_cam", "test accuracy"):
        assert name in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 2
    assert not re.search(r'(src|href)="https?://', page) and "<script" not in page


def test_demo_refuses_unknown_methods(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--methods", "gradcam"])
    assert result.exit_code == 2 and "grad_cam" in result.output
