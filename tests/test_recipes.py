"""Every recipe in recipes/ trains: one short epoch through ``llkern train --recipe`` on its own data (the CIFAR
recipes on a tiny CIFAR-10 binary folder the test writes), and the console command exits 0 on success."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llkern.cli.main import run

from .test_cifar import _named, _split, write_binary

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.json"))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_binary(root / "cifar-10-batches-bin", _named(_split(1, True), True))  # 12 training images
    write_binary(root / "cifar-10-batches-bin", _named(_split(2, False), False))  # 3 test images
    return root


def short_run(recipe: Path, cifar_root: Path) -> list[str]:
    """Options that keep the recipe's model, split, losses and heads but train a few steps."""
    options = json.loads(recipe.read_text())
    argv = ["train", "--recipe", str(recipe), "--no-progress"]
    if options.get("data") == "cifar10":
        argv += ["--data-root", str(cifar_root), "--batch-size", "4", "--lr", "0.01"]
    elif options.get("data") == "digits":
        argv += ["--batch-size", "512"]
    # sequential mode gives each module epochs / K: one epoch each
    return [*argv, "--epochs", str(options.get("k", 1) if options.get("mode") == "sequential" else 1)]


def test_there_are_recipes_of_every_kind():
    data = {json.loads(r.read_text()).get("data") for r in RECIPES}
    assert {"cifar10", "digits", "karate", "synthetic-graphs"} <= data, data


# the ContSup recipes (ResNet-32 with context encoders) take 15-30 s each on 2 cores: in the slow set
@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r.stem.startswith("contsup") else r
                                    for r in RECIPES], ids=[r.stem for r in RECIPES])
def test_recipe_trains(recipe, cifar_root):
    # (the InfoPro and MLP-SR heads once failed on the CIFAR ResNets' flattened last module)
    result = run(short_run(recipe, cifar_root))
    history = result["history"]
    # (sequential mode trains one module an epoch: the others report None)
    losses = [v for row in history for v in row["loss"] if v is not None]
    assert history and losses and all(math.isfinite(v) for v in losses), history
    k = json.loads(recipe.read_text()).get("k", 1)
    assert len(result["evaluation"]["accuracy"]) == k


def test_the_command_exits_0_on_success_and_2_on_bad_options(cifar_root):
    recipe = ROOT / "recipes" / "infopro-resnet32-k4.json"
    ok = subprocess.run([sys.executable, "-m", "llkern", *short_run(recipe, cifar_root)], capture_output=True,
                        text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "test accuracy" in ok.stdout and "{'evaluation'" not in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "llkern", "train", "-k", "0"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "-k" in bad.stderr
