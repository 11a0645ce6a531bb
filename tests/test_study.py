"""The study runner (eval/study.py) on a tiny matrix: SimCLR on semantic and augmented pairs,
2 epochs on the tiny world, through the debug (in-process) and local (subprocess) executors, a
cell interrupted midway and resumed, finished cells skipped, and the SLURM submission checked
against a fake submitit executor.

The matrix runs once per module (in-process, interrupted once); the local executor completes a
copy of the finished study that lost one result, so that it starts a single subprocess (each one
spends seconds importing torch). The tiny networks run on one thread: on busy cores, two OpenMP
threads wait on each other many times longer than the work takes."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest
import submitit
import torch

from common import utils, world
from eval import report, study
from eval.features import file_digest
from tests.conftest import REPO, TINY_WORLD

CELLS = {"semantic": "simclr-semantic-epochs2-w1-s0", "augmented": "simclr-augmented-epochs2-w1-s0"}
TINY_STUDY = ["--preset", "embedded-quick", "--cells", "simclr-*", "--epochs", "2", "--world", *TINY_WORLD,
              "--train-args=--batch-size 8 --workers 0 --log-every 1"]
STEPS_PER_EPOCH = 4  # 32 pairs / batch 8


class Killed(BaseException):
    """Stands for a kill: no `except Exception` of the scripts stops it."""


def run_study(*args):
    """eval.study's main in this process; returns what it printed (stdout and stderr)."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        study.main([*TINY_STUDY, *map(str, args)])
    return out.getvalue()


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_world):
    """The tiny study through the debug executor, first killed right after the first cell's first
    checkpoint, then rerun to the end. Returns its folder, a copy of the folder as the kill left
    it, and the output of the rerun."""
    root = tmp_path_factory.mktemp("study")
    end_epoch = utils.Run.end_epoch

    def end_epoch_then_die(run, *args, **kwargs):
        end_epoch(run, *args, **kwargs)
        raise Killed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(utils.Run, "end_epoch", end_epoch_then_die)
            with pytest.raises(Killed):
                run_study("--executor", "debug", "--out", root)
        killed = tmp_path_factory.mktemp("killed") / "study"
        shutil.copytree(root, killed)
        output = run_study("--executor", "debug", "--out", root)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, killed=killed, output=output)


def test_debug_executor_runs_the_matrix_and_reports_it(tiny_study):
    root = tiny_study.root
    accuracy = {}
    for pairs, name in CELLS.items():
        folder = root / name
        record = json.loads((folder / "cell.json").read_text())
        assert record["git_commit"] == utils.git_commit()
        assert record["train"][:3] == ["simclr.py", "--pairs", pairs]
        config = json.loads((folder / "config.json").read_text())
        # the quick preset reports on world 1, held out from calibration (world 0)
        assert [config[k] for k in ("method", "pairs", "epochs", "world")] == ["simclr", pairs, 2, [*TINY_WORLD, "seed=1"]]
        assert config["world_config"]["seed"] == 1 and config["world_version"] == world.WORLD_VERSION
        assert config["git_commit"] == record["git_commit"]
        assert (folder / "backbone.pth").is_file()
        results = {p.name: json.loads(p.read_text()) for p in (folder / "results").iterdir()}
        assert results.keys() == study.embedded_evals(TINY_WORLD, invariance=False).keys()  # the quick preset
        for result in results.values():
            assert result["schema"] == report.SCHEMA and result["checkpoint"] == str(folder / "backbone.pth")
            assert (result["pairs"], result["epochs"]) == (pairs, 2)
            assert (result["world_version"], result["world_seed"]) == (world.WORLD_VERSION, 1)
            assert result["world_config"] == config["world_config"] and result["embedding_std"] > 0
        accuracy[pairs] = {split: results[f"linear-embedded-{split}-center.json"]["accuracy"]
                           for split in ("seen", "unseen")}

    # The full presets also measure invariance, on 5 counterfactual instances per class of the world's 4.
    invariance = study.embedded_evals(TINY_WORLD)["invariance.json"]
    assert invariance[invariance.index("--n") + 1] == str(5 * 4)

    # The report of the study folder: the Figure 4 table with delta = SP - AP, and its PNG.
    out = root / "report"
    assert "Figure 4 layout: linear accuracy" in (out / "report.md").read_text()
    assert (out / "figure4-linear.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split(",") for line in (out / "results.csv").read_text().splitlines()]
    deltas = {row[2]: float(row[4]) for row in rows if row[0] == "figure4-linear" and row[3] == "delta"}
    assert deltas.keys() == {"embedded-seen", "embedded-unseen"}
    for split in ("seen", "unseen"):
        assert deltas[f"embedded-{split}"] == pytest.approx(accuracy["semantic"][split] - accuracy["augmented"][split])


def test_a_killed_cell_resumes_from_its_checkpoint(tiny_study):
    killed = tiny_study.killed / CELLS["semantic"]
    assert torch.load(killed / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not (killed / "backbone.pth").exists() and not (tiny_study.killed / CELLS["augmented"]).exists()

    folder = tiny_study.root / CELLS["semantic"]
    assert f"resumed from {folder / 'checkpoint.pth'}" in tiny_study.output
    assert tiny_study.output.count("resumed from") == 1  # the other cell started afresh
    log = read_log(folder)
    # One record per step and per epoch: a run started again from scratch would repeat epoch 1.
    assert [r["step"] for r in log if "step" in r] == list(range(2 * STEPS_PER_EPOCH))
    assert [r["epoch"] for r in log if "step" not in r] == [1, 2]
    assert (folder / "backbone.pth").is_file()


def test_a_rerun_skips_finished_cells(tiny_study):
    root = tiny_study.root
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "report" not in p.parts}
    output = run_study("--executor", "debug", "--out", root)
    assert f"[{CELLS['semantic']}] done" in output and f"[{CELLS['augmented']}] done" in output
    assert "] python " not in output  # no command ran
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "report" not in p.parts} == files
    listing = run_study("--out", root, "--list").splitlines()
    assert len(listing) == 2 and all(line.endswith(" done") for line in listing)


def test_local_executor_runs_what_is_left_in_subprocesses(tiny_study, tmp_path, capfd, monkeypatch):
    # The finished study with one result lost: the local executor runs just that evaluation.
    root = tmp_path / "study"
    shutil.copytree(tiny_study.root, root, ignore=shutil.ignore_patterns("report"))
    folder, probe = root / CELLS["semantic"], "linear-embedded-seen-center.json"
    (folder / "results" / probe).unlink()
    calls = []
    run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append((cmd, kwargs)) or run(cmd, **kwargs))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_study("--executor", "local", "--out", root)

    pythons = [(cmd, kwargs) for cmd, kwargs in calls if cmd[0] == sys.executable]  # not git's
    assert [cmd[:3] for cmd, _ in pythons] == [[sys.executable, "-m", "eval.linear_probe"]]
    assert pythons[0][1]["cwd"] == REPO
    assert f'"out": "{folder / "results" / probe}"' in capfd.readouterr().out  # printed by the subprocess
    result = json.loads((folder / "results" / probe).read_text())
    assert result["checkpoint_sha256"] == file_digest(folder / "backbone.pth")
    assert json.loads((folder / "cell.json").read_text())["git_commit"] == utils.git_commit()

    rows = [line.split(",") for line in (root / "report" / "results.csv").read_text().splitlines()]
    seen = {row[3]: float(row[4]) for row in rows if row[:3] == ["figure4-linear", "simclr", "embedded-seen"]}
    assert seen["delta"] == pytest.approx(seen["SP"] - seen["AP"]) and seen["SP"] == pytest.approx(result["accuracy"])
    assert (root / "report" / "figure4-linear.png").is_file()


def test_local_jobs_run_cells_side_by_side_with_their_share_of_the_cores(tiny_study, tmp_path, monkeypatch):
    root = tmp_path / "study"
    shutil.copytree(tiny_study.root, root, ignore=shutil.ignore_patterns("report"))
    for name in CELLS.values():
        (root / name / "results" / "linear-embedded-unseen-center.json").unlink()
    spans = []
    run = subprocess.run

    def timed_run(cmd, **kwargs):
        start = time.perf_counter()
        result = run(cmd, **kwargs)
        if cmd[0] == sys.executable:
            spans.append((start, time.perf_counter(), kwargs["env"]["OMP_NUM_THREADS"]))
        return result

    monkeypatch.setattr(subprocess, "run", timed_run)
    monkeypatch.delenv("OMP_NUM_THREADS")
    run_study("--executor", "local", "--jobs", "2", "--out", root)
    assert len(spans) == 2 and max(s for s, _, _ in spans) < min(e for _, e, _ in spans)  # at the same time
    assert {threads for _, _, threads in spans} == {str(max(1, os.cpu_count() // 2))}
    for name in CELLS.values():
        assert (root / name / "results" / "linear-embedded-unseen-center.json").is_file()
        log = (root / name / "commands.log").read_text()
        assert "$ python -m eval.linear_probe" in log and '"eval": "linear"' in log  # the command and its output

    (root / CELLS["semantic"] / "results" / "linear-embedded-unseen-center.json").unlink()
    (root / CELLS["semantic"] / "backbone.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=f"{CELLS['semantic']}.*failed: see .*commands.log"):
        run_study("--executor", "local", "--jobs", "2", "--out", root)


class FakeExecutor:
    """Records what run_slurm submits. A real submitit executor (the debug cluster, which needs
    no SLURM) checks the parameter names; job ids count up from 100 as SLURM's would."""

    def __init__(self, folder, executors):
        self.real, self.params, self.tasks = submitit.AutoExecutor(folder=folder, cluster="debug"), {}, []
        self.job_id = str(100 + len(executors))
        executors.append(self)

    def update_parameters(self, **params):
        self.real.update_parameters(**params)
        self.params.update(params)

    def submit_array(self, tasks):
        self.tasks = list(tasks)
        return [SimpleNamespace(job_id=f"{self.job_id}_{i}") for i in range(len(tasks))]

    def submit(self, function, *args):
        self.tasks, self.args = [function], args
        return SimpleNamespace(job_id=self.job_id)


def test_slurm_submits_checkpointable_arrays_and_dependent_evaluations(tmp_path):
    a, cells, root = study.parse_args([
        "--preset", "figure4", "--seeds", "0", "--out", str(tmp_path / "study"), "--executor", "slurm",
        "--imagenet", "imagenet/train", "--manifest", "pairs.csv", "--partition", "gpu", "--account", "lab",
        "--gpus-per-node", "4", "--nodes", "2", "--eval-gpus", "1", "--cpus-per-task", "6", "--time", "600",
        "--array-parallelism", "3"])
    assert len(cells) == 8  # 4 methods x SP/AP
    by_name = {c.name: c for c in cells}
    # simclr-semantic is trained (its evaluations are not run yet), vicreg-augmented is finished.
    for name in ("simclr-semantic-s0", "vicreg-augmented-s0"):
        (root / name).mkdir(parents=True)
        (root / name / "backbone.pth").touch()
    (root / "vicreg-augmented-s0" / "results").mkdir()
    for result in by_name["vicreg-augmented-s0"].evals:
        (root / "vicreg-augmented-s0" / "results" / result).touch()

    executors = []
    submission = study.run_slurm(cells, root, a, lambda: FakeExecutor(tmp_path / "logs", executors))

    array, evaluations, report_job = executors[0], executors[1:-1], executors[-1]
    to_train = [c.name for c in cells if c.name not in ("simclr-semantic-s0", "vicreg-augmented-s0")]
    assert [t.cell.name for t in array.tasks] == to_train and list(submission.train) == to_train
    assert all(t.stage == "train" for t in array.tasks)
    assert array.params.items() >= dict(slurm_partition="gpu", slurm_account="lab", nodes=2, gpus_per_node=4,
                                        tasks_per_node=4, cpus_per_task=6, timeout_min=600,
                                        slurm_array_parallelism=3).items()
    train = array.tasks[0].cell.train_commands(root)[0]
    assert train[train.index("--data") + 1] == os.path.abspath("imagenet/train")  # commands run in the repository
    assert train[-3:] == ["--out", str(root / to_train[0]), "--resume"]

    assert list(submission.eval) == [c.name for c in cells if c.name != "vicreg-augmented-s0"]
    for executor in evaluations:
        (task,) = executor.tasks
        assert task.stage == "eval"
        assert executor.params.items() >= dict(slurm_partition="gpu", slurm_account="lab", nodes=1, gpus_per_node=1,
                                               tasks_per_node=1, timeout_min=600).items()
        after = executor.params.get("slurm_additional_parameters")
        if task.cell.name == "simclr-semantic-s0":
            assert after is None
        else:  # after its own task of the array, and cancelled if that fails
            assert after == {"dependency": f"afterok:{array.job_id}_{to_train.index(task.cell.name)}",
                             "kill_on_invalid_dep": "yes"}
    # The report once every job has ended, however it ended.
    assert (report_job.tasks, report_job.args) == ([study.build_report], (root, False))
    assert report_job.params["slurm_additional_parameters"]["dependency"] == \
        "afterany:" + ":".join([*submission.train.values(), *submission.eval.values()])
    assert "gpus_per_node" not in report_job.params and report_job.params["cpus_per_task"] == 1
    for name, train in submission.train.items():  # what --status reads
        assert json.loads((root / name / "cell.json").read_text())["slurm_jobs"] == \
            {"train": train, "eval": submission.eval[name]}

    # Checkpointable: on preemption or timeout submitit requeues the same stage of the same cell.
    for task in (array.tasks[0], evaluations[0].tasks[0]):
        requeued = task.checkpoint()
        assert isinstance(requeued, submitit.helpers.DelayedSubmission)
        assert (requeued.function.cell, requeued.function.stage) == (task.cell, task.stage)

    # A rerun once everything is done submits nothing.
    for c in cells:
        (root / c.name / "backbone.pth").touch()
        (root / c.name / "results").mkdir(exist_ok=True)
        for result in c.evals:
            (root / c.name / "results" / result).touch()
    executors.clear()
    assert study.run_slurm(cells, root, a, lambda: FakeExecutor(tmp_path / "logs", executors)) == study.Submission()
    assert executors == []


def sbatch_script(a, stage, folder):
    """The sbatch script submitit writes for a stage's jobs (its #SBATCH lines are the request)."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**study.slurm_parameters(a, stage))
    return [line for line in executor._executor._make_submission_file_text("true", "0").splitlines()
            if line.startswith("#SBATCH")]


def test_cpu_partitions_get_one_task_per_node_and_no_gres(tmp_path):
    args = ["--preset", "figure4", "--out", str(tmp_path), "--imagenet", "in", "--manifest", "m.csv",
            "--partition", "cpu", "--cpus-per-task", "4"]
    a, _, _ = study.parse_args([*args, "--gpus-per-node", "0", "--eval-gpus", "0", "--nodes", "2"])
    for stage, nodes in (("train", 2), ("eval", 1), ("report", 1)):
        lines = sbatch_script(a, stage, tmp_path)
        assert not [line for line in lines if "gpu" in line or "gres" in line], lines
        assert {"#SBATCH --ntasks-per-node=1", f"#SBATCH --nodes={nodes}", "#SBATCH --partition=cpu",
                f"#SBATCH --cpus-per-task={1 if stage == 'report' else 4}"} <= set(lines)
    # GPU jobs keep one task per GPU.
    a, _, _ = study.parse_args([*args, "--gpus-per-node", "8", "--eval-gpus", "2", "--signal-delay", "300"])
    assert {"#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --signal=USR2@300"} <= \
        set(sbatch_script(a, "train", tmp_path))
    assert {"#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=1"} <= set(sbatch_script(a, "eval", tmp_path))


def test_a_signal_delay_longer_than_the_time_limit_is_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        study.parse_args(["--preset", "embedded", "--out", "x", "--time", "1", "--signal-delay", "60"])
    assert refused.value.code == 2
    assert "--signal-delay 60 s must be shorter than --time 1 min" in capsys.readouterr().err


def test_status_without_slurm_reads_the_study_folder(tiny_study, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study.shutil, "which", lambda command: None)  # no SLURM installed
    root = tmp_path / "study"
    shutil.copytree(tiny_study.root, root)
    # The semantic cell's training job failed (submitit's record of it), the augmented cell lost a result.
    folder = root / CELLS["semantic"]
    (folder / "backbone.pth").unlink()
    record = json.loads((folder / "cell.json").read_text())
    (folder / "cell.json").write_text(json.dumps({**record, "slurm_jobs": {"train": "7_0", "eval": "8"}}))
    (root / "slurm").mkdir()
    submitit.core.utils.cloudpickle_dump(("error", "Traceback ..."), root / "slurm" / "7_0_0_result.pkl")
    (root / CELLS["augmented"] / "results" / "linear-embedded-seen-center.json").unlink()

    study.main(["--status", "--out", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{root}: 2 cells: 0 done, 0 queued, 0 running, 1 failed, 1 unfinished"
    assert lines[1].split() == [CELLS["augmented"], "unfinished"]
    assert lines[2].split() == [CELLS["semantic"], "failed", "training", "job", "7_0,", "log",
                                str(root / "slurm" / "7_0_0_log.err")]


def test_presets_sharing_a_cell_run_all_their_evaluations(tmp_path):
    a, cells, _ = study.parse_args(["--preset", "paper", "--seeds", "0", "--out", str(tmp_path), "--list"])
    assert len({c.name for c in cells}) == len(cells)
    merged = {c.name: c for c in cells}["simclr-semantic-s0"]
    expected = {}
    for name, preset in study.paper_presets(a).items():
        for c in preset:
            if c.name == "simclr-semantic-s0":
                expected.update(c.evals)
    assert merged.evals == expected
    assert {"linear-cifar100-center.json", "detection-voc07.json", "linear-stl10-random.json"} <= expected.keys()


def listed(*args):
    out = io.StringIO()
    with redirect_stdout(out):
        study.main([*args, "--list"])
    return out.getvalue().split()


def test_every_world_preset_lists_its_cells():
    cells = {preset: listed("--preset", preset) for preset in study.WORLD}
    runs = [f"{m}-{p}" for m in study.METHODS for p in study.PAIRS] + ["supervised", "random"]
    assert cells["world-figure4"] == [f"{run}-w{w}-s0" for run in runs for w in (1, 2, 3)]
    simclr = {f"simclr-{p}-w{w}-s0" for p in study.PAIRS for w in (1, 2, 3)}

    def ablation(setting):
        return {f"simclr-{p}-{setting}-w{w}-s0" for p in study.PAIRS for w in (1, 2, 3)}

    # x1, x2, x4 the world's 15 epochs; 50 and 100 of 157 pairs a class as 6 and 13 of the world's 20.
    assert set(cells["world-table1"]) == simclr | ablation("epochs30") | ablation("epochs60")
    assert set(cells["world-table5"]) == simclr | ablation("images_per_class6") | ablation("images_per_class13")
    assert set(cells["world-figure5"]) == simclr | ablation("transformsno_gray") | ablation("transformsno_color") \
        | ablation("transformsonly_crop")
    assert set(cells["world-table4"]) == simclr
    assert set(cells["world-table2"]) == ablation("archresnet18") | {f"random-archresnet18-w{w}-s0" for w in (1, 2, 3)}
    vit = f"arch{study.WORLD_VIT}"
    assert set(cells["world-table3"]) == {f"dino-{p}-{vit}-warmup_epochs2-w{w}-s0" for p in study.PAIRS
                                          for w in (1, 2, 3)} | {f"random-{vit}-w{w}-s0" for w in (1, 2, 3)}
    paper = cells["world-paper"]
    assert len(paper) == len(set(paper)) and set(paper) == set().union(*(cells[p] for p in study.WORLD[:-1]))
    # One cell, the evaluations of every preset it is in: Table 4's random-crop probes and the invariance.
    _, [main], _ = study.parse_args(["--preset", "world-paper", "--cells", "simclr-semantic-w1-s0", "--list"])
    assert {"linear-embedded-seen-random.json", "linear-embedded-unseen-center.json",
            "invariance.json"} <= main.evals.keys()


def test_a_tiny_world_paper_runs_end_to_end_to_the_claims(tmp_path, tiny_world):
    """Every cell of world-paper, one epoch in one tiny world, through the debug executor, down to
    CLAIMS.md: every claim measured (one replicate: unresolved) or, for what one epoch leaves
    collapsed, marked not testable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(out):
            study.main(["--preset", "world-paper", "--world", *TINY_WORLD, "--world-seeds", "1", "--epochs", "1",
                        "--executor", "debug", "--out", str(tmp_path),
                        "--train-args=--batch-size 8 --workers 0",
                        "--detection-args=--iters 2 --batch-size 2 --min-sizes 64 --precise-bn-iters 0",
                        "--finetune-args=--epochs 1 --batch-size 4"])
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "report" / "CLAIMS.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["claim"] for r in rows} == {f"C{i}" for i in range(1, 10)}
    for r in rows:
        assert r["verdict"] in ("unresolved", "not testable here"), r
        assert r["n"] == "1" or "collapsed" in r["note"], r
    kinds = {json.loads(p.read_text())["eval"] for p in tmp_path.glob("*/results/*.json")}
    assert kinds == {"linear", "invariance", "detection", "finetune"}
