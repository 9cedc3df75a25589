"""The ``llkern`` command line: train on digits and on CIFAR-format files, recipes, logs, resume, errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llkern.cli.main as cli
from llkern.cli.options import UsageError
from llkern.cli.train import CHOICES, parse


def run(*argv):
    return cli.run(["train", "--no-progress", *argv])


def test_train_digits_local_logs_every_epoch(tmp_path):
    torch.set_num_threads(1)
    log = tmp_path / "run.json"
    out = run("--epochs", "3", "-k", "2", "--log", str(log))
    rows = json.loads(log.read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(len(r["loss"]) == 2 and r["peak_saved_bytes"] > 0 and r["step_time_s"] > 0 for r in rows)
    assert rows[-1]["loss"][1] < rows[0]["loss"][1]
    assert out["evaluation"]["accuracy"][-1] > 0.8  # digits in 3 epochs, the last of two heads


def test_end_to_end_is_one_module(tmp_path):
    torch.set_num_threads(1)
    out = run("--epochs", "1", "-k", "1", "--model", "mlp")
    assert len(out["evaluation"]["accuracy"]) == 1


def test_transformer_gets_token_heads():
    torch.set_num_threads(1)
    out = run("--epochs", "1", "-k", "2", "--model", "transformer", "--split", "layers")
    assert len(out["evaluation"]["accuracy"]) == 2 and out["evaluation"]["accuracy"][-1] > 0.2


def test_recipe_and_override(tmp_path):
    torch.set_num_threads(1)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"description": "test", "model": "mlp", "k": 3, "epochs": 1, "split": "layers"}))
    out = run("--recipe", str(recipe), "-k", "2")  # the command line wins over the recipe
    assert len(out["history"][0]["loss"]) == 2
    recipe.write_text(json.dumps({"modle": "mlp"}))
    with pytest.raises(UsageError):
        run("--recipe", str(recipe))
    recipe.write_text(json.dumps({"loss": "TRGL"}))  # a value argparse would refuse on the command line
    with pytest.raises(UsageError):
        run("--recipe", str(recipe))


def test_resume_continues(tmp_path):
    torch.set_num_threads(1)
    checkpoint = tmp_path / "run.pt"
    # a constant learning rate: a schedule's length is fixed by the first run's --epochs
    common = ("-k", "2", "--model", "mlp", "--schedule", "constant", "--checkpoint", str(checkpoint))
    first = run("--epochs", "1", *common)
    out = run("--epochs", "2", *common, "--resume")
    assert [r["epoch"] for r in out["history"]] == [1, 2]
    assert out["history"][0] == first["history"][0]  # epoch 1 was loaded, not trained again


def test_resume_with_another_accumulate_is_refused_where_schedules_count_steps(tmp_path):
    torch.set_num_threads(1)
    checkpoint = tmp_path / "run.pt"
    common = ("-k", "2", "--model", "mlp", "--epochs", "2", "--checkpoint", str(checkpoint))
    run(*common, "--accumulate", "4", "--schedule", "onecycle")
    # (it trained the resumed epoch, then OneCycleLR refused a step beyond the 4-batch groups' count)
    with pytest.raises(UsageError, match=r"trained with --accumulate 4.*resume with --accumulate 4"):
        run(*common, "--epochs", "3", "--resume", "--accumulate", "1")
    # the same accumulate resumes; a constant schedule counts nothing and takes another
    assert len(run(*common, "--epochs", "3", "--resume")["history"]) == 3
    constant = ("-k", "2", "--model", "mlp", "--schedule", "constant", "--checkpoint", str(tmp_path / "constant.pt"))
    run(*constant, "--epochs", "1", "--accumulate", "2")
    assert len(run(*constant, "--epochs", "2", "--resume", "--accumulate", "1")["history"]) == 2


def write_cifar_binary(root, n=16):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], images], axis=1).tobytes())


def test_cifar_files_through_the_loader(tmp_path):
    torch.set_num_threads(1)
    write_cifar_binary(tmp_path)
    out = run("--data", "cifar10", "--data-root", str(tmp_path), "--model", "resnet32", "-k", "2",
              "--epochs", "1", "--batch-size", "16")
    assert out["history"][0]["samples"] == 5 * 16


def test_errors(tmp_path):
    with pytest.raises(UsageError, match="data-root"):
        run("--data", "cifar10")
    with pytest.raises(UsageError, match="does not take"):
        run("--model", "resnet32", "--epochs", "1")  # 3×32×32 model on 1×8×8 digits
    with pytest.raises(SystemExit):  # argparse's own check of the option's type
        run("-k", "0")
    with pytest.raises(UsageError, match="resume"):
        run("--resume", "--epochs", "1")


def test_console_entry_point():
    result = subprocess.run([sys.executable, "-m", "llkern", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--split" in result.stdout


RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.json"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_parse(recipe):
    args = parse(["--recipe", str(recipe), "--data-root", "somewhere"])
    values = json.loads(recipe.read_text())
    for name, value in values.items():  # every value the recipe sets reaches the arguments, and is valid
        if name != "description":
            assert getattr(args, name) == value, name
        if name in CHOICES:
            assert value in CHOICES[name], name


@pytest.mark.slow  # ResNet-32 with both context encoders: minutes on 2 cores
def test_contsup_recipe_runs_on_cifar_files(tmp_path):
    # a published setting, pointed at (tiny) CIFAR-10 files, with a short budget
    torch.set_num_threads(1)
    write_cifar_binary(tmp_path)
    out = run("--recipe", str(RECIPES[0].parent / "contsup-resnet32-k4-RE.json"), "--data-root", str(tmp_path),
              "--epochs", "1", "--batch-size", "16")
    assert len(out["evaluation"]["accuracy"]) == 4


@pytest.mark.parametrize("options", [("--loss", "infopro", "-k", "3"), ("--heads", "mlp-sr", "-k", "2"),
                                     ("--relu-masks", "--recompute-bn-relu", "-k", "2")])
def test_heads_losses_and_activation_options(options):
    torch.set_num_threads(1)
    out = run("--epochs", "1", *options)
    assert out["evaluation"]["accuracy"][-1] > 0.3


def test_recompute_segments_trains_the_same_net_in_less_saved_memory(tmp_path):
    # --recompute-segments is exact: the same losses and accuracy, each module's recomputed segments saving less
    torch.set_num_threads(1)
    outs, rows = [], []
    for segments in ("1", "3"):
        log = tmp_path / f"run{segments}.json"
        outs.append(run("--epochs", "1", "-k", "2", "--recompute-segments", segments, "--log", str(log)))
        rows.append(json.loads(log.read_text())[-1])
    assert rows[0]["loss"] == rows[1]["loss"]
    assert outs[0]["evaluation"]["accuracy"] == outs[1]["evaluation"]["accuracy"]
    assert rows[1]["peak_saved_bytes"] < 0.75 * rows[0]["peak_saved_bytes"]
    with pytest.raises(UsageError, match=r"--recompute-segments.*image models"):
        run("--model", "gcn", "--data", "karate", "--recompute-segments", "2")
    with pytest.raises(SystemExit):
        parse(["--recompute-segments", "0"])


def test_memory_budget_chooses_k_and_segments_and_saves_the_choice(tmp_path, capsys):
    import llkern
    from llkern.cli.train import _body, _model
    from llkern.data import load_digits

    torch.set_num_threads(1)
    budget = 3 * 2**20
    out = run("--memory-budget", "3MiB", "--epochs", "1", "--output-dir", str(tmp_path / "run"))
    printed = capsys.readouterr().out
    # the choice is llkern.fit_memory's for this model and batch, printed, trained, and saved as -k and -S
    x = load_digits(seed=0)[0]
    model, _ = _body(_model("digits-resnet", x[:8]))
    fit = llkern.fit_memory(model, budget, example_input=x[:32], batch_size=64)
    assert (fit.k, fit.segments) != (1, 1) and str(fit) in printed
    options = json.loads((tmp_path / "run" / "options.json").read_text())
    assert (options["k"], options["recompute_segments"], options["memory_budget"]) == (fit.k, fit.segments, None)
    row = json.loads((tmp_path / "run" / "log.json").read_text())[-1]
    assert len(row["loss"]) == fit.k and row["peak_saved_bytes"] <= 1.02 * budget  # heads included
    evaluated = cli.run(["eval", "--checkpoint", str(tmp_path / "run")])  # rebuilt from the saved options
    assert evaluated["evaluation"]["accuracy"] == out["evaluation"]["accuracy"]
    # K = 1 with segments: recomputed at the planner's units, as fit_memory measured it (not the model's children)
    five = llkern.fit_memory(model, 5 * 2**20, example_input=x[:32], batch_size=64)
    assert five.k == 1 and five.segments > 1
    out = run("--memory-budget", "5MiB", "--epochs", "1", "--output-dir", str(tmp_path / "one"))
    row = json.loads((tmp_path / "one" / "log.json").read_text())[-1]
    assert abs(row["peak_saved_bytes"] - five.peak_bytes) <= 0.02 * five.peak_bytes
    evaluated = cli.run(["eval", "--checkpoint", str(tmp_path / "one")])
    assert evaluated["evaluation"]["accuracy"] == out["evaluation"]["accuracy"]
    trained = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["net"]
    fitted = llkern.LocalNet(five.modules, num_classes=10, example_input=x[:2]).state_dict()
    assert [k for k in trained if k.startswith("blocks.")] == [k for k in fitted if k.startswith("blocks.")]
    with pytest.raises(UsageError, match=r"--resume rebuilds the saved network.*drop --memory-budget"):
        run("--resume", "--output-dir", str(tmp_path / "run"), "--memory-budget", "3MiB")
    with pytest.raises(UsageError, match=r"--memory-budget 10.00 KiB: fit_memory: no split.*--batch-size"):
        run("--memory-budget", "10KiB")
    with pytest.raises(UsageError, match="--split layers: add --split saved_bytes"):
        run("--memory-budget", "3MiB", "--split", "layers")
    with pytest.raises(UsageError, match=r"--split layers \(as --recipe infopro-resnet110-k4 sets it\)"):
        run("--recipe", "infopro-resnet110-k4", "--memory-budget", "40MiB")
    with pytest.raises(UsageError, match=r"--memory-budget 3.00 MiB chose K = 3 modules, and --epochs 10: sequential"):
        run("--memory-budget", "3MiB", "--mode", "sequential", "--epochs", "10")
    with pytest.raises(UsageError, match=r"--memory-budget.*image models"):
        run("--model", "gcn", "--data", "karate", "--memory-budget", "1MiB")
    for bad in ("=0", "=3MiX", "=-1MiB"):  # (with "=": argparse takes a lone -1MiB for an option)
        with pytest.raises(SystemExit):
            parse([f"--memory-budget{bad}"])
    assert parse(["--memory-budget", "1.5 GiB"]).memory_budget == 3 * 2**29
    assert parse(["--memory-budget", "500MB"]).memory_budget == 500 * 10**6


@pytest.mark.parametrize("options", [("--relu-masks", "--recompute-bn-relu"),  # (the other two in the slow set)
                                     pytest.param(("--precision", "bf16"), marks=pytest.mark.slow),
                                     pytest.param(("--saved-dtype", "bf16"), marks=pytest.mark.slow)])
def test_memory_budget_fits_the_modules_as_the_activation_options_and_precision_make_them(options, tmp_path, capsys):
    # at 2 MiB the plain fp32 layers do not fit digits-resnet at a batch of 64 with any K and S; converted, or saved
    # by a bf16 step, they do: the run takes fit_memory's choice, saves no more than the budget, and trains exactly
    # as the -k / --recompute-segments it chose with the same options
    torch.set_num_threads(1)
    with pytest.raises(UsageError, match=r"--memory-budget 2.00 MiB: fit_memory: no split .*the least was .* Try a "
                                         r"smaller --batch-size or lighter --heads, or add --relu-masks / "
                                         r"--recompute-bn-relu / --precision bf16 / --saved-dtype bf16$") as refused:
        run("--memory-budget", "2MiB")
    assert "(the most this model allows)" in str(refused.value)  # (not the Python call's max_k)
    log = tmp_path / "budget.json"
    run("--memory-budget", "2MiB", *options, "--epochs", "1", "--log", str(log))
    printed = capsys.readouterr().out
    k, segments = re.search(r"fit_memory: K = (\d+) modules?, (\d+) recomputed", printed).groups()
    row = json.loads(log.read_text())[-1]
    assert len(row["loss"]) == int(k) and row["peak_saved_bytes"] <= 2 * 2**20
    # the split plan's table shows the plain fp32 bytes it balanced: the run says that it saves others
    note = re.search(r"\(the plan's bytes are the plain layers' in fp32; with (.*) the run saves others", printed)
    assert int(k) == 1 or all(option in note.group(1).split() for option in options)
    saved = re.search(r"with its heads, local losses and context the largest module saves ([\d.]+) MiB", printed)
    assert abs(row["peak_saved_bytes"] / 2**20 - float(saved.group(1))) < 0.01
    run("-k", k, "--recompute-segments", segments, *options, "--epochs", "1", "--log", str(tmp_path / "chosen.json"))
    assert json.loads((tmp_path / "chosen.json").read_text())[-1]["loss"] == row["loss"]


def test_saved_dtype_stores_the_saved_tensors_in_16_bits(tmp_path):
    # --saved-dtype bf16: saved_tensors_in around the training; the trainer's meter counts the copies it stores
    torch.set_num_threads(1)
    rows = {}
    for dtype in ("fp32", "bf16"):
        log = tmp_path / f"{dtype}.json"
        run("-k", "2", "--epochs", "1", "--saved-dtype", dtype, "--log", str(log))
        rows[dtype] = json.loads(log.read_text())[-1]
    assert rows["bf16"]["peak_saved_bytes"] < 0.55 * rows["fp32"]["peak_saved_bytes"]
    assert rows["bf16"]["loss"] != rows["fp32"]["loss"]  # the backward read rounded activations
    assert rows["bf16"]["loss"] == pytest.approx(rows["fp32"]["loss"], rel=1e-2)
    # graph data: the sparse adjacency is kept as it is
    out = run("--model", "gcn", "--data", "synthetic-graphs", "-k", "2", "--epochs", "1", "--saved-dtype", "bf16")
    assert len(out["history"]) == 1
    with pytest.raises(SystemExit):
        parse(["--saved-dtype", "int8"])


def test_memory_budget_counts_the_heads_and_losses_on_top_of_the_blocks(tmp_path, capsys, monkeypatch):
    # MLP-SR heads save about 1 MiB per module on digits: candidates whose blocks fit but not with their heads are
    # passed over, and the run trains exactly as the -k / --recompute-segments it chose
    torch.set_num_threads(1)
    # context_add's reference path: its Triton kernel under the interpreter would take minutes for 17 candidates
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run("--memory-budget", "3MiB", "--heads", "mlp-sr", "--epochs", "1", "--log", str(tmp_path / "budget.json"))
    printed = capsys.readouterr().out
    assert "fits, not accepted" in printed
    chosen = re.search(r"fit_memory: K = (\d+) modules?, (\d+) recomputed", printed).groups()
    saved = re.search(r"with its heads, local losses and context the largest module saves ([\d.]+) MiB", printed)
    row = json.loads((tmp_path / "budget.json").read_text())[-1]
    assert row["peak_saved_bytes"] <= 3 * 2**20 and abs(row["peak_saved_bytes"] / 2**20 - float(saved.group(1))) < 0.01
    run("-k", chosen[0], "--recompute-segments", chosen[1], "--heads", "mlp-sr", "--epochs", "1", "--log",
        str(tmp_path / "chosen.json"))
    assert json.loads((tmp_path / "chosen.json").read_text())[-1]["loss"] == row["loss"]
    # ContSup context encoders that alone exceed the budget; candidates whose boundaries take no context are named
    with pytest.raises(UsageError, match=r"with the heads, local losses and context the least was [\d.]+ MiB .*"
                                         r"could not run with them \(K = \d+: ContextSupply"):
        run("--model", "digits-lenet", "--context", "RE", "--memory-budget", "150KiB")


# --- MOLE's data and models (issue 7): digits as vectors and images, graphs ----------------------------------

@pytest.mark.parametrize("options,bar", [
    (("--model", "mlp", "--data", "digits-vectors", "-k", "3", "--split", "layers", "--epochs", "3"), 0.6),
    (("--model", "digits-cnn", "--data", "digits", "-k", "3", "--split", "layers", "--epochs", "3"), 0.6),
    (("--model", "gcn", "--data", "karate", "-k", "2", "--epochs", "6"), 0.7),
    (("--model", "gcn", "--data", "synthetic-graphs", "-k", "3", "--epochs", "15", "--batch-size", "32"), 0.6),
])
def test_mole_data_and_models(options, bar, tmp_path):
    torch.set_num_threads(1)
    log = tmp_path / "run.json"
    out = run("--loss", "mi", "--mode", "sequential", "--log", str(log), *options)
    k = int(options[options.index("-k") + 1])
    rows = json.loads(log.read_text())
    assert [r["active_module"] for r in rows] == [m for m in range(k) for _ in range(len(rows) // k)]
    assert len(out["evaluation"]["accuracy"]) == k and out["evaluation"]["accuracy"][-1] > bar


def test_graph_end_to_end_and_checkpoint(tmp_path):
    torch.set_num_threads(1)
    checkpoint = tmp_path / "run.pt"
    common = ("--model", "gcn", "--data", "karate", "-k", "1", "--schedule", "constant", "--checkpoint",
              str(checkpoint))
    first = run("--epochs", "1", *common)
    out = run("--epochs", "2", *common, "--resume")
    assert [r["epoch"] for r in out["history"]] == [1, 2] and out["history"][0] == first["history"][0]
    assert out["evaluation"]["accuracy"][0] > 0.5


def test_graph_errors():
    with pytest.raises(UsageError, match="graph data"):
        run("--model", "gcn", "--data", "digits")
    with pytest.raises(UsageError, match="needs --model gcn"):
        run("--model", "mlp", "--data", "karate")
    with pytest.raises(UsageError, match="--loss ce or mi"):
        run("--model", "gcn", "--data", "karate", "--loss", "trgl")
    with pytest.raises(UsageError, match="at most 2 modules"):
        run("--model", "gcn", "--data", "karate", "-k", "3")
    with pytest.raises(UsageError, match="does not take"):
        run("--model", "digits-cnn", "--data", "digits-vectors", "--epochs", "1")


def test_mole_recipe_runs():
    torch.set_num_threads(1)
    out = run("--recipe", str(RECIPES[0].parent / "mole-karate-k2.json"), "--epochs", "4")
    assert len(out["history"]) == 4 and out["evaluation"]["accuracy"][-1] > 0.6


def test_distributed_under_torchrun(tmp_path):
    """Two gloo processes started by torchrun: each trains on half of every global batch (DDP per module)."""
    log = tmp_path / "run.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "llkern", "train", "--distributed", "--no-progress", "--model", "mlp", "-k", "2",
               "--epochs", "2", "--batch-size", "128", "--loss", "mi", "--mode", "sequential", "--log-file", str(log)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(log.read_text())
    train_samples = 1437  # load_digits' training split
    # sequential: module 0 then module 1; each process took 64 of every 128 (the last 29-sample batch: 14)
    assert [r["active_module"] for r in rows] == [0, 1]
    assert all(r["samples"] == (train_samples // 128) * 64 + (train_samples % 128) // 2 for r in rows)
    assert result.stdout.count("test accuracy of the last head") == 1  # rank 0 only
    accuracy = float(re.search(r"test accuracy of the last head on [^:]*: ([0-9.]+) %", result.stdout).group(1))
    assert result.stdout.count("epoch 1/2 ") == 1  # one summary line per epoch, from rank 0
    # one epoch per module of MI training: 78.9 % measured (chance: 10 %). The 81.7 % of before came from a split
    # that charged the whole training set to module 0 (test_split.py: test_a_slice_of_a_larger_batch_...)
    assert accuracy > 70


def test_distributed_needs_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UsageError, match="torchrun"):
        run("--distributed", "--epochs", "1")
    with pytest.raises(UsageError, match="graph data"):
        run("--distributed", "--model", "gcn", "--data", "karate")


@pytest.mark.slow  # three torchrun launches: fresh interpreters, ~20 s
def test_pipeline_under_torchrun_then_resume_and_eval(tmp_path):
    """The README's pipeline command: two gloo processes, one stage each; then --resume and llkern eval."""
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llkern",
            "train", "--pipeline-stages", "2", "--no-progress", "-k", "4", "--output-dir", str(tmp_path)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*base, "--epochs", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline: stage 0: modules 0-1; stage 1: modules 2-3" in result.stdout
    assert result.stdout.count("epoch 2/2 ") == 1  # from rank 0 only
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint.stage0.pt", "checkpoint.stage1.pt"]
    rows = json.loads((tmp_path / "log.json").read_text())
    assert len(rows) == 2 and all(v is not None for v in rows[-1]["loss"])  # every stage's modules reported
    result = subprocess.run([*base, "--epochs", "3", "--resume"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after epoch 2" in result.stdout and "epoch 3/3 " in result.stdout
    trained = re.search(r"test accuracy per head .*: ([0-9., ]+); last head", result.stdout).group(1)
    from llkern.cli.train import evaluate_main

    evaluated = evaluate_main(["--checkpoint", str(tmp_path)])  # the shards joined, in one process
    assert evaluated["epochs"] == 3
    assert ", ".join(f"{100 * a:.2f}" for a in evaluated["evaluation"]["accuracy"]) == trained
    # any stage's shard names the whole run
    shard = evaluate_main(["--checkpoint", str(tmp_path / "checkpoint.stage1.pt")])
    assert shard["evaluation"]["accuracy"] == evaluated["evaluation"]["accuracy"]


@pytest.mark.slow  # two torchrun launches
def test_memory_budget_under_torchrun_fits_the_process_batch_and_the_stages(tmp_path):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llkern",
            "train", "--no-progress", "--model", "digits-lenet", "--epochs", "1", "--memory-budget", "1MiB"]
    # data parallel: each process runs half of the global batch of 128; 1 MiB holds the whole LeNet (K = 1)
    result = subprocess.run([*base, "--distributed", "--batch-size", "128"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"fit_memory: K = 1 module, 1 recomputed segment per module; .* for a batch of 64 ",
                     result.stdout)
    # a pipeline of 2 stages needs 2 modules whatever the budget allows: the fit starts at K = 2
    result = subprocess.run([*base, "--pipeline-stages", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fit_memory: K = 2 modules" in result.stdout
    assert "pipeline: stage 0: module 0; stage 1: module 1" in result.stdout
    # the logged peak is the largest stage's, here stage 1's (module 2 of digits-resnet in 3 modules): what the fit
    # predicted for the largest module with its head
    log = tmp_path / "pipeline.json"
    result = subprocess.run([*base[:8], "train", "--no-progress", "--pipeline-stages", "2", "--epochs", "1",
                             "--memory-budget", "1MiB", "--relu-masks", "--recompute-bn-relu", "--saved-dtype", "bf16",
                             "--log-file", str(log)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline: stage 0: module 0; stage 1: modules 1-2" in result.stdout
    saved = re.search(r"with its heads, local losses and context the largest module saves ([\d.]+) KiB", result.stdout)
    row = json.loads(log.read_text())[-1]
    predicted = float(saved.group(1)) * 1024
    assert abs(row["peak_saved_bytes"] - predicted) <= 0.02 * predicted  # (stage 0 alone holds 0.59 of it)


def test_pipeline_options_are_checked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UsageError, match="--pipeline-stages runs under torchrun"):
        run("--pipeline-stages", "2", "--epochs", "1")
    with pytest.raises(UsageError, match="sequential"):
        run("--pipeline-stages", "2", "--mode", "sequential")
    with pytest.raises(UsageError, match="give one"):
        run("--pipeline-stages", "2", "--distributed")
    with pytest.raises(UsageError, match="--accumulate works without the pipeline"):
        run("--pipeline-stages", "2", "--accumulate", "2")
    with pytest.raises(SystemExit):
        run("--pipeline-stages", "0")


@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
def test_accumulate_plans_the_schedule_in_optimizer_steps(mode):
    # 1437 training digits in batches of 64: 23 batches an epoch, 8 optimizer steps in groups of 3 (the last of
    # two). The one-cycle schedule is planned for those steps (per module: 16 in 2 epochs, or 8 in its one
    # sequential epoch), not for 23 an epoch; the row's lr is the rate after the schedule's last step.
    torch.set_num_threads(1)
    out = run("--model", "digits-cnn", "--epochs", "2", "-k", "2", "--accumulate", "3", "--mode", mode,
              "--schedule", "onecycle", "--lr", "2e-3")
    last = out["history"][-1]
    assert last["steps"] == 23
    total = 16 if mode == "simultaneous" else 8
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=total)
    for _ in range(total):
        optimizer.step()
        schedule.step()
    assert last["lr"] == pytest.approx([optimizer.param_groups[0]["lr"]] * 2, rel=1e-9)


def test_graph_model_trains_under_bf16():
    torch.set_num_threads(1)
    out = run("--model", "gcn", "--data", "karate", "--precision", "bf16", "--epochs", "3", "-k", "2", "--loss", "ce")
    assert len(out["history"]) == 3 and all(np.isfinite(v) for v in out["history"][-1]["loss"])
