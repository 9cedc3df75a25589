"""The one ``llkern`` command: subcommands, exit statuses, help, --version, --output-dir with eval, resume that
extends a finished run, recipes by name, a folder of images, the per-epoch line, TensorBoard, bench."""

import json
import re
import subprocess
import sys

import pytest
import torch

import llkern.cli.main as cli
from llkern import kernel_available
from llkern.cli.options import UsageError
from llkern.cli.recipes import recipe_names
from llkern.cli.train import parse
from llkern.local.logs import TensorBoardLogger, format_epoch

FAST = ("--no-progress", "--model", "mlp", "--split", "layers", "--batch-size", "256")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def status(argv, capsys):
    """(exit status, stdout, stderr) of ``llkern ARGV``; argparse's own exits included."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    (["train", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["train", "--epochs", "-1"], "--epochs: expected an integer >= 1"),
    (["train", "--lr", "nan"], "--lr: expected a number > 0"),
    (["train", "-k", "1000", "--epochs", "1"], "-k/--modules 1000"),
    (["train", "--data", "cifar10"], "needs --data-root"),
    (["train", "--data", "folder", "--data-root", "/nonexistent/llkern"], "is not a folder"),
    (["train", "--device", "tpu"], "--device"),
    (["train", "--log", "run.txt"], "--log"),
    (["train", "--recipe", "no-such-recipe"], "installed: "),
    (["eval", "--checkpoint", "/nonexistent/run"], "does not exist"),
    (["fly"], "unknown command"),
    ([], "COMMAND"),
])
def test_bad_input_exits_2_with_a_short_message(argv, message, capsys):
    code, out, err = status(argv, capsys)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # a short message, not a traceback


def test_empty_data_root_and_cuda_on_a_cpu_machine(tmp_path, capsys):
    code, _, err = status(["train", "--data", "cifar10", "--data-root", str(tmp_path)], capsys)
    assert code == 2 and "is empty" in err
    if not torch.cuda.is_available():
        code, _, err = status(["train", "--device", "cuda"], capsys)
        assert code == 2 and "no CUDA device" in err


def test_output_paths_and_bounds_checked_before_any_work(tmp_path, capsys, monkeypatch):
    # A path that cannot be written, or a value out of range, exits 2 before data is read or a step trained
    # (each command's work is replaced by a failure here); missing parent folders are created.
    def no_work(*args, **kwargs):
        raise AssertionError("the command started its work")

    for module in ("llkern.cli.compress_demo", "llkern.cli.moda_demo", "llkern.cli.demo"):
        monkeypatch.setattr(f"{module}.run", no_work)
    monkeypatch.setattr("llkern.cli.train._data", no_work)
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, message in [
        (["train", "--output-dir", str(afile)], "--output-dir: "),
        (["train", "--log", f"{afile}/x.json"], "is a file, not a folder"),
        (["train", "--checkpoint", f"{afile}/deeper/c.pt"], "--checkpoint: cannot write"),
        (["train", "--checkpoint", str(tmp_path)], None),  # a folder names its checkpoint.pt: no error here
        (["train", "--mode", "sequential", "-k", "3", "--epochs", "4"], "give a multiple of 3 (e.g. 3 or 6)"),
        (["compress", "--out", f"{afile}/x.mira"], "--out: cannot write"),
        (["compress", "--json", str(tmp_path)], "--json: "),
        (["compress", "--json", str(tmp_path / "same.mira"), "--out", str(tmp_path / "same.mira")], "same file"),
        (["compress", "--bits", "25"], "--bits: expected an integer from 1 to 24"),
        (["compress", "--bits", "2", "--block-size", "513"], "at most 256 weights per coded bit, 512"),
        (["compress", "--retrain-fraction", "-1"], "--retrain-fraction: expected a number from 0 to 1"),
        (["compress", "--retrain-fraction", "nan"], "--retrain-fraction: expected a number from 0 to 1"),
        (["compress", "--seed", "-1"], "--seed: expected an integer from 0 to 4294967295"),
        (["compress", "--device", "tpu"], "--device"),
        (["moda", "--device", "tpu"], "--device"),
        (["moda", "--out", f"{afile}/report.md"], "--out: cannot write"),
        (["moda", "--data", "cifar10"], "--data cifar10 needs --data-root"),
        (["demo", "--modules", "9"], "expected an integer from 1 to 8"),
        (["demo", "--plot", f"{afile}/demo.png"], "--plot: cannot write"),
    ]:
        if message is None:
            with pytest.raises(AssertionError, match="started its work"):
                cli.main(argv)
            continue
        code, _, err = status(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    monkeypatch.undo()
    log, checkpoint = tmp_path / "new" / "logs" / "run.json", tmp_path / "other" / "c.pt"
    code, _, err = status(["train", *FAST, "-k", "2", "--epochs", "1", "--log", str(log), "--checkpoint",
                           str(checkpoint)], capsys)
    assert code == 0, err
    assert log.is_file() and checkpoint.is_file()


def test_help_shows_the_recipe_values(capsys):
    _, plain, _ = status(["train", "--help"], capsys)
    code, out, _ = status(["train", "--recipe", "infopro-resnet110-k4", "--help"], capsys)
    assert code == 0
    assert "(default: digits-resnet)" in plain and "(default: digits-resnet)" not in out
    assert "(default: resnet110)" in out and "(default: infopro)" in out
    # a recipe or checkpoint that cannot be read still gives the help (the plain one)
    for argv in (["--recipe", "no-such-recipe", "--help"], ["--resume", "--help"]):
        code, out, _ = status(["train", *argv], capsys)
        assert code == 0 and "(default: digits-resnet)" in out, argv


def test_pipeline_checkpoints_resume_only_as_a_pipeline(tmp_path, capsys):
    # The saved options say how a checkpoint was trained; a resume in another layout is refused in one line.
    options = {"k": 2, "epochs": 1, "model": "mlp"}
    shards = tmp_path / "shards"
    shards.mkdir()
    torch.save({"metadata": {"options": {**options, "pipeline_stages": 2}}}, shards / "checkpoint.stage0.pt")
    single = tmp_path / "single"
    single.mkdir()
    torch.save({"metadata": {"options": {**options, "pipeline_stages": None}}}, single / "checkpoint.pt")
    for argv, message in [
        (["--output-dir", str(shards)], "shards of a 2-stage pipeline run; resume it the way it was trained: "
                                        "torchrun --nproc-per-node 2 -m llkern train --pipeline-stages 2"),
        (["--output-dir", str(shards), "--pipeline-stages", "3"], "was trained with 2 stages"),
        (["--output-dir", str(single), "--pipeline-stages", "2"], "was not trained as a pipeline"),
    ]:
        code, _, err = status(["train", "--resume", *argv], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_version_and_help(capsys):
    code, out, _ = status(["--version"], capsys)
    assert code == 0 and re.match(r"llkern \d+\.\d+\.\d+ \(torch ", out)
    code, out, _ = status(["--help"], capsys)
    assert code == 0 and all(name in out for name in cli.COMMANDS)
    for command in ("train", "eval", "demo", "compress", "moda", "recipes", "bench"):
        code, out, _ = status([command, "--help"], capsys)
        assert code == 0 and f"usage: llkern {command}" in out, command
        assert "``" not in out and ":func:" not in out and ":class:" not in out, command  # plain text
    _, out, _ = status(["train", "--help"], capsys)
    assert "(default: 64)" in out and "(default: saved_bytes)" in out  # --batch-size, --split
    assert "(default: None)" not in out and "(default: False)" not in out


def test_output_dir_then_eval_rebuilds_the_net(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = status(["train", *FAST, "-k", "2", "--epochs", "2", "--output-dir", str(run_dir)], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2  loss ")
    assert "test % " in lines[1] and "saved " in lines[1] and "MiB" in lines[1]
    assert {p.name for p in run_dir.iterdir()} >= {"options.json", "log.json", "checkpoint.pt", "curves.png"}
    options = json.loads((run_dir / "options.json").read_text())
    assert options["k"] == 2 and options["model"] == "mlp"
    trained = cli.run(["train", *FAST, "-k", "2", "--epochs", "2", "--output-dir", str(run_dir), "--resume"])
    evaluated = cli.run(["eval", "--checkpoint", str(run_dir)])
    assert evaluated["epochs"] == 2
    assert evaluated["evaluation"]["accuracy"] == pytest.approx(trained["evaluation"]["accuracy"])
    assert evaluated["evaluation"]["accuracy"][-1] > 0.5
    assert "test accuracy per head" in capsys.readouterr().out


def test_resume_extends_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    first = cli.run(["train", *FAST, "-k", "2", "--epochs", "1", "--output-dir", str(run_dir)])  # one-cycle
    # the saved options are the defaults: only --epochs is given again
    out = cli.run(["train", "--no-progress", "--output-dir", str(run_dir), "--resume", "--epochs", "3"])
    assert [r["epoch"] for r in out["history"]] == [1, 2, 3]
    assert out["history"][0] == first["history"][0]
    lrs = [r["lr"][0] for r in out["history"]]
    assert lrs[1] > lrs[2] > 0  # the schedule planned for 3 epochs, annealing to its end
    assert json.loads((run_dir / "options.json").read_text())["epochs"] == 3
    with pytest.raises(UsageError, match="trained 3 epochs already"):
        cli.run(["train", "--no-progress", "--output-dir", str(run_dir), "--resume", "--epochs", "2"])


def test_checkpoint_of_another_network_is_refused_in_one_line(tmp_path, capsys):
    # A state dict that does not fit lists every key; the message keeps to one short line.
    run_dir = tmp_path / "run"
    assert status(["train", *FAST, "-k", "2", "--epochs", "1", "--output-dir", str(run_dir)], capsys)[0] == 0
    code, _, err = status(["train", "--no-progress", "--output-dir", str(run_dir), "--resume", "--model", "digits-cnn",
                           "--data", "digits"], capsys)
    assert code == 2 and "does not fit these options" in err
    assert len(err.strip().splitlines()) == 1 and len(err) < 500, err


def test_recipes_by_name_and_listed(capsys):
    names = recipe_names()
    assert "infopro-resnet110-k4" in names and "digits-resnet-k4" in names
    args = parse(["--recipe", "infopro-resnet110-k4", "--data-root", "somewhere"])
    assert (args.model, args.k, args.loss) == ("resnet110", 4, "infopro")
    code, out, _ = status(["recipes"], capsys)
    assert code == 0 and all(name in out for name in names)


def test_the_recipes_are_the_installed_package_data():
    from importlib import resources
    from pathlib import Path

    repo = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.json"))
    assert recipe_names() == repo
    assert (resources.files("llkern.recipes") / "digits-resnet-k4.json").is_file()


def write_image_folder(root, per_class=12, size=8):
    from PIL import Image

    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}
    g = torch.Generator().manual_seed(0)
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = torch.randint(-20, 21, (size, size, 3), generator=g)
            pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_folder_of_images_trains_with_augmentation(tmp_path):
    write_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    out = cli.run(["train", *FAST, "--data", "folder", "--data-root", str(tmp_path / "images"), "-k", "2",
                   "--epochs", "2", "--augment", "--batch-size", "8", "--output-dir", str(run_dir)])
    assert out["history"][0]["samples"] == 3 * 12 - 3 * 2  # 20 % held out
    # the data root is one of the saved options: resume and eval find the images again
    out = cli.run(["train", "--no-progress", "--output-dir", str(run_dir), "--resume", "--epochs", "3"])
    assert len(out["history"]) == 3 and out["evaluation"]["accuracy"][-1] > 0.5  # three colours
    assert cli.run(["eval", "--checkpoint", str(run_dir)])["evaluation"] == out["evaluation"]


def test_augment_needs_images(capsys):
    code, _, err = status(["train", "--data", "digits-vectors", "--model", "mlp", "--augment"], capsys)
    assert code == 2 and "--augment" in err


def test_epoch_line_and_tensorboard_scalars(tmp_path):
    row = {"epoch": 2, "loss": [0.5, None], "accuracy": [0.9, None], "lr": [0.1, 0.1], "eval_accuracy": 0.875,
           "peak_saved_bytes": 3 * 2**20, "epoch_time_s": 1.25}
    line = format_epoch(row, 10)
    assert line == "epoch 2/10  loss 0.500 -  acc % 90.0 -  test % 87.50  saved 3.0 MiB  1.2 s"

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag, step] = value

        def flush(self):
            pass

    writer = Writer()
    TensorBoardLogger(tmp_path, writer=writer)(row)
    assert writer.scalars == {("loss/module_0", 2): 0.5, ("accuracy/module_0", 2): 0.9, ("lr/module_0", 2): 0.1,
                              ("lr/module_1", 2): 0.1, ("test/accuracy", 2): 0.875,
                              ("memory/peak_saved_MiB", 2): 3.0, ("time/epoch_s", 2): 1.25}


def test_tensorboard_files_where_installed(tmp_path):
    pytest.importorskip("tensorboard")
    cli.run(["train", *FAST, "-k", "2", "--epochs", "1", "--output-dir", str(tmp_path / "run")])
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_bench_times_llkern_and_eager(capsys):
    from llkern.cli import bench

    rows = cli.run(["bench", "--min-time", "0.01", "--no-progress"])
    assert [r.op for r in rows] == list(bench.OPS)  # every op by default
    assert all(r.llkern_ms > 0 and r.eager_ms > 0 for r in rows)
    # the path column says whether llkern's compiled kernel ran (this build has every CPU kernel)
    built = kernel_available("transport_penalty", "cpu")
    assert {r.path for r in rows} == {"kernel" if built else "reference"}
    out = capsys.readouterr().out
    assert "speed-up" in out and "batch_norm_relu" in out


@pytest.mark.parametrize("op", ["transport_penalty", "aux_head_loss", "info_nce", "supcon_loss",
                                "renyi_mutual_information", "relu_with_mask", "batch_norm_relu"])
def test_bench_compares_equal_computations(op):
    # llkern's op and the eager code it is timed against compute the same values and input gradients
    from llkern.cli import bench

    case = bench._case(op, "small", torch.device("cpu"), torch.float64)
    inputs = case.inputs
    assert inputs
    fused = case.fused()
    fused_grads = torch.autograd.grad(fused, inputs, case.grad, allow_unused=True)
    eager = case.eager()
    eager_grads = torch.autograd.grad(eager, inputs, case.grad, allow_unused=True)
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-9)
    for a, b in zip(fused_grads, eager_grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_bench_min_time_is_bounded(capsys):
    for value in ("inf", "0", "nan", "61"):
        code, _, err = status(["bench", "--min-time", value], capsys)
        assert code == 2 and "--min-time" in err, (value, err)


@pytest.mark.parametrize("module", ["llkern", "llkern.demo", "llkern.cli.demo", "llkern.moda_demo",
                                    "llkern.compress_demo"])
def test_python_m_forms_still_work(module):
    argv = [sys.executable, "-m", module] + (["demo"] if module == "llkern" else []) + ["--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
