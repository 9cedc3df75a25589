"""The main job (make demo) meets its accuracy bar: both >= 95%, local within 2 points of end to end."""

import pytest

from llkern.cli import demo


@pytest.mark.slow
def test_demo_accuracy_bar(tmp_path):
    local, end_to_end = demo.run(demo.build_parser().parse_args([]))  # the defaults `make demo` runs
    assert local.test_accuracy >= 0.95 and end_to_end.test_accuracy >= 0.95
    assert local.test_accuracy >= end_to_end.test_accuracy - 0.02
    assert local.peak_saved_bytes < 0.5 * end_to_end.peak_saved_bytes
    table = demo.format_table([local, end_to_end])
    assert "local K=4" in table and "end to end" in table
    assert len(local.accuracy_per_epoch) == 20 and local.accuracy_per_epoch[-1] == local.test_accuracy
    pytest.importorskip("matplotlib")
    assert demo.plot([local, end_to_end], str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
