"""The study runner against a real SLURM: a one-node cluster with one CPU partition (munge,
slurmctld, slurmd, and slurmdbd for sacct) that tests/slurm/start_slurm.sh installs and starts.
Tiny world studies go through `python -m eval.study --executor slurm --gpus-per-node 0`, and the
tests check what SLURM makes of them: the array and its dependencies, the results and the report,
a failing cell, resubmission, refused submissions, and a training task requeued by `scontrol
requeue` or at its time limit, which resumes from its checkpoint to the weights of an
uninterrupted run. Skipped, with the script's reason, where it cannot run (not root, no Debian
packages)."""
import json
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO, TINY_WORLD, run_script

pytestmark = pytest.mark.slurm

CPU_STUDY = ["--preset", "embedded-quick", "--world", *TINY_WORLD, "--executor", "slurm", "--partition", "cpu",
             "--gpus-per-node", "0", "--eval-gpus", "0", "--cpus-per-task", "1"]
TRAIN_ARGS = "--batch-size 8 --workers 0 --device cpu"
# Checkpoints every epoch of 4 steps; no kNN monitor but the last, which would dominate long tiny runs.
LONG_TRAIN_ARGS = f"--train-args={TRAIN_ARGS} --checkpoint-every 4 --eval-every 100000"
LIVE = "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED,REQUEUED,REQUEUE_HOLD,REQUEUE_FED,RESIZING"


@pytest.fixture(scope="session")
def slurm():
    """The local cluster, started (or found running) by the script; SLURM_CONF points at it."""
    script = REPO / "tests" / "slurm" / "start_slurm.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr}"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SLURM_CONF", proc.stdout.splitlines()[-1].removeprefix("SLURM_CONF="))
        yield


def slurm_command(*args):
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def submit(root, *args, check=True):
    """`python -m eval.study` on the CPU partition."""
    return run_script("-m", "eval.study", *CPU_STUDY, "--out", root, *args, check=check)


def status(root):
    return run_script("-m", "eval.study", "--status", "--out", root).stdout.splitlines()


def cell_jobs(root, cell):
    return json.loads((root / cell / "cell.json").read_text())["slurm_jobs"]


def submitted_jobs(root):
    """Every job submitted for the study: submitit writes <id>_submission.sh for each (one per array)."""
    return sorted(p.name.removesuffix("_submission.sh") for p in (root / "slurm").glob("*_submission.sh"))


def cancel(root):
    """Cancels what is left of a study's jobs (scancel passes over those that ended)."""
    if submitted_jobs(root):
        subprocess.run(["scancel", *submitted_jobs(root)], capture_output=True)


@pytest.fixture
def cancel_at_end():
    """Cancels the jobs of the study folders it is given, should a test end before they do."""
    roots = []
    yield roots.append
    for root in roots:
        cancel(root)


def wait_until_ended(jobs, timeout=600):
    """Waits until none of the jobs is queued or running (a guard against a hang, not a timing target)."""
    deadline = time.monotonic() + timeout
    while True:
        live = subprocess.run(["squeue", "--noheader", "--array", f"--jobs={','.join(jobs)}", f"--states={LIVE}",
                               "--format=%i %T %r"], capture_output=True, text=True)
        if live.returncode and "Invalid job id" in live.stderr:  # squeue's answer when the one job asked for is gone
            return
        assert live.returncode == 0, live.stderr
        if not live.stdout:
            return
        assert time.monotonic() < deadline, f"still queued or running after {timeout} s:\n{live.stdout}"
        time.sleep(1)


def wait_for(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def show_job(job):
    """scontrol's record of a job (an array task: 12_3) as a dict."""
    return dict(re.findall(r"(\S+?)=(\S*)", slurm_command("scontrol", "--oneliner", "show", "job", job)))


def sacct_states(job, every_run=False):
    """sacct's state of a job; with every_run, one per run (a requeued job's earlier runs: REQUEUED)."""
    out = slurm_command("sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={job}", "--format=State",
                        *(["--duplicates"] if every_run else []))
    return [line.split()[0] for line in out.splitlines()]  # "CANCELLED by 0" -> CANCELLED


def first_run_ended(job):
    return bool(set(sacct_states(job, every_run=True)) - {"PENDING", "RUNNING"})


@pytest.fixture
def uninterrupted(tmp_path):
    """Starts a cell's pretraining command in a process of its own, to compare weights with: returns
    its process and output folder (its output goes to OUT.log). Stopped should the test end first."""
    processes = []

    def start(root, cell):
        train, out = json.loads((root / cell / "cell.json").read_text())["train"], tmp_path / "uninterrupted"
        with open(f"{out}.log", "w") as log:
            processes.append(subprocess.Popen([sys.executable, *train, "--out", str(out)], cwd=REPO, stdout=log,
                                              stderr=log))
        return processes[-1], out

    yield start
    for process in processes:
        process.kill()
        process.wait()


def assert_same_weights(path, reference):
    weights, expected = (torch.load(p, weights_only=True) for p in (path, reference))
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected), f"{path} differs from {reference}"


# ---------------------------------------------------------------- a study of three cells

# The quick preset's cells, in world 1
SP, AP = "simclr-semantic-epochs1-w1-s0", "simclr-augmented-epochs1-w1-s0"
FAILING = "vicreg-semantic-epochs1-w1-s0"  # its checkpoint does not load
CELLS = (SP, AP, FAILING)


@pytest.fixture(scope="module")
def study(slurm, tiny_world, tmp_path_factory):
    """Three cells of one epoch, the third failing. Submitted while another job holds the node, so
    that SLURM's view of the queue is looked at before anything runs; submitted a second time
    while queued; then run to the end."""
    root = tmp_path_factory.mktemp("slurm") / "study"
    (root / FAILING).mkdir(parents=True)
    (root / FAILING / "checkpoint.pth").write_text("not a checkpoint")
    args = ["--cells", "simclr-*", "vicreg-semantic-*", "--epochs", "1", f"--train-args={TRAIN_ARGS}"]
    blocker = slurm_command("sbatch", "--parsable", "--exclusive", "--job-name=blocker", "--output=/dev/null",
                            "--wrap=sleep 600").strip()
    try:
        first = submit(root, *args).stdout
        jobs = {cell: cell_jobs(root, cell) for cell in CELLS}
        report = re.search(r"submitted report job (\d+)", first).group(1)
        queue = {job: show_job(job) for cell in CELLS for job in jobs[cell].values()} | {report: show_job(report)}
        again = submit(root, *args).stdout
        submitted = submitted_jobs(root)
    finally:
        slurm_command("scancel", blocker)
    try:
        wait_until_ended(submitted)
        yield SimpleNamespace(root=root, args=args, first=first, again=again, jobs=jobs, report=report,
                              queue=queue, submitted=submitted, status=status(root))
    finally:
        cancel(root)


def test_the_array_and_its_dependencies_as_slurm_sees_them(study):
    array = study.jobs[SP]["train"].split("_")[0]
    assert [study.jobs[cell]["train"] for cell in CELLS] == [f"{array}_{i}" for i in range(3)]
    lines = study.first.splitlines()
    assert lines[0] == f"submitted pretraining array {array} (3 tasks)"
    for cell in CELLS:
        assert f"submitted evaluation job {study.jobs[cell]['eval']} for {cell} after training " \
               f"{study.jobs[cell]['train']} succeeds" in lines
    evaluations = [study.jobs[c]["eval"] for c in CELLS]
    assert f"follow them: squeue --jobs={','.join([array, *evaluations, study.report])}" in lines
    assert f"status: python -m eval.study --status --out {study.root}" in lines

    for i, cell in enumerate(CELLS):
        train, evaluation = study.queue[study.jobs[cell]["train"]], study.queue[study.jobs[cell]["eval"]]
        assert (train["JobName"], train["ArrayJobId"], train["ArrayTaskId"]) == ("sempairs-train", array, str(i))
        # A CPU job: one task, one CPU, no gres.
        assert (train["JobState"], train["NumTasks"], train["CPUs/Task"]) == ("PENDING", "1", "1")
        assert "gres" not in train["TRES"] and "gpu" not in train["TRES"]
        assert (evaluation["JobName"], evaluation["JobState"]) == ("sempairs-eval", "PENDING")
        assert evaluation["Dependency"] == f"afterok:{array}_{i}(unfulfilled)"
        assert evaluation["KillOInInvalidDependent"] == "Yes"  # SLURM's spelling
    report = study.queue[study.report]
    assert report["JobName"] == "sempairs-report"
    trainings = [study.jobs[c]["train"] for c in CELLS]
    assert report["Dependency"] == ",".join(f"afterany:{job}(unfulfilled)" for job in [*trainings, *evaluations])

    # Submitted again while queued: nothing new.
    assert study.again.splitlines()[0] == f"not submitted again, their jobs are queued or running: {', '.join(CELLS)}"
    assert study.submitted == sorted([array, *(study.jobs[c]["eval"] for c in CELLS), study.report])

    # What accounting recorded.
    assert [sacct_states(study.jobs[c]["train"]) for c in CELLS] == [["COMPLETED"], ["COMPLETED"], ["FAILED"]]
    assert [sacct_states(study.jobs[c]["eval"]) for c in CELLS] == [["COMPLETED"], ["COMPLETED"], ["CANCELLED"]]
    assert sacct_states(study.report) == ["COMPLETED"]


def test_results_are_written_and_the_report_is_built(study):
    for cell in (SP, AP):
        folder = study.root / cell
        results = [json.loads(p.read_text()) for p in sorted((folder / "results").iterdir())]
        assert [(r["dataset"], r["split"]) for r in results] == [("embedded", "seen"), ("embedded", "unseen")]
        assert all(r["checkpoint"] == str(folder / "backbone.pth") for r in results)
    rows = [line.split(",") for line in (study.root / "report" / "results.csv").read_text().splitlines()]
    assert {row[2] for row in rows if row[:2] == ["figure4-linear", "simclr"] and row[3] == "delta"} == \
        {"embedded-seen", "embedded-unseen"}
    assert "Figure 4 layout" in (study.root / "report" / "report.md").read_text()


def test_a_failing_cell_does_not_start_its_evaluations_and_is_reported_with_its_log(study):
    train, evaluation = study.jobs[FAILING]["train"], study.jobs[FAILING]["eval"]
    assert not (study.root / FAILING / "results").exists()
    assert not (study.root / "slurm" / f"{evaluation}_0_log.out").exists()  # the job never started
    assert show_job(evaluation)["Reason"] == "DependencyNeverSatisfied"

    log = study.root / "slurm" / f"{train}_0_log.err"
    assert study.status[0] == f"{study.root}: 3 cells: 2 done, 0 queued, 0 running, 1 failed, 0 unfinished"
    assert study.status[1:] == [f"{AP:48s} done", f"{SP:48s} done",
                                f"{FAILING:48s} failed      training job {train}, log {log}"]
    assert f"'--out', '{study.root / FAILING}', '--resume']' returned non-zero exit status 1" in log.read_text()


def test_submitting_again_submits_what_is_unfinished_then_nothing(study):
    """Runs last of the study's tests: it completes the failed cell."""
    (study.root / FAILING / "checkpoint.pth").unlink()
    again = submit(study.root, *study.args).stdout
    new = sorted(set(submitted_jobs(study.root)) - set(study.submitted))
    train, evaluation = (cell_jobs(study.root, FAILING)[stage] for stage in ("train", "eval"))
    assert again.splitlines()[:2] == [f"submitted pretraining job {train}",
                                      f"submitted evaluation job {evaluation} for {FAILING} after training {train} "
                                      "succeeds"]
    assert len(new) == 3  # training, evaluation, report
    wait_until_ended(new)
    assert status(study.root)[0] == f"{study.root}: 3 cells: 3 done, 0 queued, 0 running, 0 failed, 0 unfinished"

    finished = submit(study.root, *study.args).stdout
    assert finished.splitlines()[0] == "nothing to submit: every cell is done"
    assert "Figure 4 layout" in finished  # the report, built from the results
    assert sorted(set(submitted_jobs(study.root)) - set(study.submitted)) == new


# ---------------------------------------------------------------- refused submissions

def test_a_refused_pretraining_array_ends_with_sbatch_s_message_and_submits_nothing(slurm, tiny_world, tmp_path,
                                                                                     cancel_at_end):
    root = tmp_path / "study"
    cancel_at_end(root)
    refused = submit(root, "--cells", "simclr-*", "--epochs", "1", "--gpus-per-node", "1", check=False)  # a node without GPUs
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "error: sbatch refused the pretraining array: sbatch: error: "
        "Invalid generic resource (gres) specification"]
    assert submitted_jobs(root) == [] and not list(root.glob("*/cell.json"))


def test_a_refused_evaluation_job_cancels_the_array_submitted_before_it(slurm, tiny_world, tmp_path, cancel_at_end):
    root = tmp_path / "study"
    cancel_at_end(root)
    refused = submit(root, "--cells", "simclr-*", "--epochs", "1", "--eval-gpus", "1", check=False)
    assert refused.returncode == 2
    (array,) = submitted_jobs(root)
    assert refused.stderr.splitlines() == [
        f"error: sbatch refused the evaluation job of {SP}: sbatch: error: "
        "Invalid generic resource (gres) specification (cancelled the 2 jobs submitted before it)"]
    wait_until_ended([array])
    assert set(sacct_states(array)) == {"CANCELLED"}
    assert not list(root.glob("*/cell.json"))


# ---------------------------------------------------------------- requeue and time limit

def test_a_requeued_training_task_resumes_to_the_weights_of_an_uninterrupted_run(slurm, tiny_world, tmp_path,
                                                                                   cancel_at_end, uninterrupted):
    root, cell = tmp_path / "study", "simclr-semantic-epochs100-w1-s0"
    cancel_at_end(root)
    submit(root, "--cells", "simclr-semantic-*", "--epochs", "100", LONG_TRAIN_ARGS)
    job, checkpoint = cell_jobs(root, cell)["train"], root / cell / "checkpoint.pth"
    process, reference = uninterrupted(root, cell)
    wait_for(lambda: checkpoint.exists() or first_run_ended(job), "checkpoint")
    assert not first_run_ended(job), "the training ended before it could be requeued"
    slurm_command("scontrol", "requeue", job)

    wait_until_ended(submitted_jobs(root))
    assert process.wait() == 0, f"the uninterrupted run failed: see {reference}.log"
    assert show_job(job)["Restarts"] == "1" and sacct_states(job, every_run=True) == ["REQUEUED", "COMPLETED"]
    assert f"resumed from {checkpoint}" in (root / "slurm" / f"{job}_0_log.err").read_text()
    assert_same_weights(root / cell / "backbone.pth", reference / "backbone.pth")
    assert status(root)[1].split() == [cell, "done"]  # and evaluated


def test_a_training_task_at_its_time_limit_requeues_and_resumes_to_the_same_weights(slurm, tiny_world, tmp_path,
                                                                                     cancel_at_end, uninterrupted):
    """--time 1 --signal-delay 10: SLURM checks time limits every 30 s and sends the signal at the
    first check from 60 - 10 - 30 s on, so 20-50 s into the job; the task has checkpointed by then
    and is still training (800 epochs), and submitit checkpoints and requeues it."""
    root, cell = tmp_path / "study", "simclr-semantic-epochs800-w1-s0"
    cancel_at_end(root)
    submit(root, "--cells", "simclr-semantic-*", "--epochs", "800", LONG_TRAIN_ARGS, "--time", "1",
           "--signal-delay", "10")
    job = cell_jobs(root, cell)["train"]
    process, reference = uninterrupted(root, cell)
    wait_for(lambda: first_run_ended(job), "end of the first run")
    assert sacct_states(job, every_run=True)[0] == "REQUEUED", "the training ended before its time limit"
    # One timeout is what is tested: the rerun gets the time to finish, however busy the machine.
    slurm_command("scontrol", "update", f"JobId={job}", "TimeLimit=10")

    wait_until_ended(submitted_jobs(root))
    assert process.wait() == 0, f"the uninterrupted run failed: see {reference}.log"
    assert sacct_states(job, every_run=True) == ["REQUEUED", "COMPLETED"]
    log = (root / "slurm" / f"{job}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in log and "this job is timed-out" in log  # submitit's words
    assert f"resumed from {root / cell / 'checkpoint.pth'}" in log
    assert_same_weights(root / cell / "backbone.pth", reference / "backbone.pth")
    assert status(root)[1].split() == [cell, "done"]
