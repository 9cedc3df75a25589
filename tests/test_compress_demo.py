"""The README's compression command: LeNet-5-Caffe on digits trained, MIRACLE-coded to a file,
decoded from the file alone and evaluated."""

import pytest
import torch

from llkern.cli.compress_demo import main
from llkern.compress import miracle
from llkern.data.images import load_digits


def check_round_trip(result, path):
    # the file is what was measured: decoding it again gives the same network and accuracy
    assert path.stat().st_size == result.file_bytes
    assert result.float32_bytes == 4 * result.weights == 4 * 131080
    model = miracle.decode(path).eval()
    _, _, x_test, y_test = load_digits(seed=0)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy == pytest.approx(result.accuracy_decoded)


@pytest.mark.slow
def test_short_run(tmp_path):
    # a few hundred steps (the Mean-KL references, not the Triton interpreter, which would take an hour): the
    # whole path runs, the file is 200× smaller than the float32 weights
    # (that is the layout: 1821 blocks of 10 bits plus a ~120-byte header), and the decoded
    # network has learned digits
    path = tmp_path / "lenet.mira"
    result = main(["--out", str(path), "--pretrain-steps", "300", "--steps", "500", "--retrain-steps", "5",
                   "--chunk-blocks", "256", "--no-progress", "--impl", "reference"])
    check_round_trip(result, path)
    assert result.ratio >= 200
    assert result.accuracy_uncompressed > 0.9 and result.accuracy_decoded > 0.5  # chance: 0.1


@pytest.mark.slow
def test_default_run_meets_the_target(tmp_path):
    # the README command as it is: ≥ 200× smaller, within 2 points of the uncompressed model
    path = tmp_path / "lenet.mira"
    result = main(["--out", str(path), "--no-progress", "--impl", "reference"])
    check_round_trip(result, path)
    assert result.meets_target, result
