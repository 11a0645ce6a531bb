"""The paper's experiment matrix, declared once, run locally, in-process or as SLURM job arrays.

    python -m eval.study --preset embedded-quick --out runs/demo          # `make demo`
    python -m eval.study --preset embedded --out runs/study               # `make study`
    python -m eval.study --preset world-paper --jobs 2 --out runs/paper   # `make paper`: every claim
    python -m eval.study --preset figure4 --executor slurm --out /scratch/study \\
        --imagenet IMAGENET/train --manifest pairs.csv --downstream DATA \\
        --partition gpu --gpus-per-node 8 --time 4320 --array-parallelism 16 --account ACC
    python -m eval.study --preset embedded --executor slurm --out runs/cpu \\
        --partition cpu --gpus-per-node 0 --eval-gpus 0 --cpus-per-task 4    # a CPU partition
    python -m eval.study --status --out /scratch/study                   # where each cell stands
    python -m eval.study --preset paper --list                            # show the cells
    python -m eval.study --preset embedded --cells 'simclr-*' --epochs 10 --world num_classes=20 \\
        --train-args="--workers 4" --out runs/small                      # a smaller study

A study is a set of cells. A cell is one pretraining run (a method script, or a baseline of
eval/baselines.py) in OUT/<cell>/ and the evaluations of its backbone, each writing one result
JSON under OUT/<cell>/results/. Everything is idempotent: a cell whose backbone.pth exists is not
trained again, an evaluation whose result exists is not run again, and training always passes
--resume, so an interrupted cell continues from its last checkpoint. A cell's name states what
sets it apart (method, pairs, settings, seed), not study-wide flags (--world, --train-args): a
study with other such flags needs its own --out. OUT/<cell>/cell.json records the commands and
the git commit of the last run that had work to do (and the ids of the SLURM jobs it submitted).
At the end the study folder is turned into the paper's tables and figures (eval/report.py) and
the claims table (eval/claims.py) in OUT/report/; embedded-calibration's into eval.calibration's
figures only (OUT/report/calibration.md), which hide SP accuracy and Δ.

Presets. On ImageNet subsets, the paper's experiments: figure4, table1 .. table5, figure5, and
paper for all of them. On the embedded world, the same experiments scaled to it, in the held-out
worlds 1-3: world-figure4 (= embedded, `make study`: four methods, both pair kinds, the supervised
and random-init baselines), world-table1 (SimCLR at x1, x2, x4 the world's epochs), world-table2
(detection on the world's boxes, SimCLR with a resnet18 and the C4 detector), world-table3 (DINO
with a small ViT, fine-tuned), world-table4 (centre and random-crop probes), world-table5 (50,
100 and 157 pairs a class in the world's scale: 6, 13 and 20), world-figure5 (the four transform
settings) and world-paper for all of them (`make paper`); embedded-quick (`make demo`),
embedded-nuisance (background strength), embedded-calibration (world 0).

Executors: `local` runs each command as a subprocess, one after another (`--jobs N`: N cells at
a time, each on its share of the cores; 2 on 2 cores keeps both busy); `debug` runs them in
this process (for tests and debuggers); `slurm` submits the unfinished pretraining runs as one
submitit job array (checkpointable: on preemption, `scontrol requeue` or timeout the job is
requeued and resumes; --signal-delay says how long before its time limit it is told), each
cell's evaluations as a job that starts after its own pretraining task succeeded (and is
cancelled if it fails), and a job that builds the report once all of them have ended; it prints
the job ids and how to follow them. Cells whose jobs are still queued or running are not
submitted again. With --gpus-per-node 0 (and --eval-gpus 0) the jobs are CPU jobs: one task of
--cpus-per-task CPUs, no gres. If sbatch refuses a job, the jobs submitted before it are
cancelled and the runner ends with one line quoting sbatch (exit code 2).

--status summarises the study folder: each cell done, queued, running, failed (with the log of
the failed job: OUT/slurm/<job id>_0_log.err) or unfinished (nothing queued or running and no
failure recorded: not submitted yet, or stopped). It reads the folder's files (backbone.pth,
results/, cell.json, submitit's results in OUT/slurm/) and, where SLURM is installed, squeue (and
sacct where accounting is on) for the jobs still queued or running.
"""
import argparse
import contextlib
import io
import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path

from common.data import world_setting
from common.flags import COUNT, POSITIVE_INT, SEED, Parser
from common.utils import git_commit

REPO = Path(__file__).resolve().parents[1]
METHODS = ("simclr", "vicreg", "byol", "dino")
WORLD_VIT = "vit_tiny6_patch8"  # DINO's ViT on the world (common/backbones.py)
FINETUNE_EPOCHS = 15  # eval.finetune on the world: 50 images a class, ~1,200 steps on the seen split
PAIRS = ("semantic", "augmented")


@dataclass(frozen=True)
class Cell:
    """One pretraining run and the evaluations of its backbone. Commands are argv lists after
    `python`; in evaluation commands "{run}" stands for the cell's folder and "{result}" for the
    evaluation's result file, OUT/<cell>/results/<name>."""

    name: str
    train: tuple
    evals: dict = field(default_factory=dict)  # result file name -> command

    def folder(self, root):
        return Path(root) / self.name

    def trained(self, root):
        return (self.folder(root) / "backbone.pth").exists()

    def pending_evals(self, root):
        results = self.folder(root) / "results"
        return {name: cmd for name, cmd in self.evals.items() if not (results / name).exists()}

    def train_commands(self, root):
        """[the pretraining command] while the cell is untrained, else []."""
        run = str(self.folder(root))
        return [] if self.trained(root) else [[*self.train, "--out", run, "--resume"]]

    def eval_commands(self, root):
        """The evaluations whose result files are missing, with the cell's paths filled in."""
        run = self.folder(root)
        return [[arg.replace("{run}", str(run)).replace("{result}", str(run / "results" / name)) for arg in cmd]
                for name, cmd in self.pending_evals(root).items()]

    def commands(self, root):
        return self.train_commands(root) + self.eval_commands(root)


# ---------------------------------------------------------------- the matrix

def train_command(method, pairs, seed, flags):
    if method in ("supervised", "random"):
        return ("-m", "eval.baselines", method, "--seed", str(seed), *flags)
    return (f"{method}.py", "--pairs", pairs, "--seed", str(seed), *flags)


def cell_name(method, pairs, seed, settings):
    """e.g. simclr-semantic-s0, simclr-augmented-epochs400-s1, supervised-background_strength0.8-w1-s0
    (w1: world seed 1)."""
    parts = [method] + ([pairs] if method in METHODS else [])
    parts += [f"w{v}" if k == "seed" else f"{k}{v}" for k, v in settings.items()]
    return "-".join(parts + [f"s{seed}"])


def cell(method, pairs, seed, evals, data_flags=(), world=(), **settings):
    """A cell; `settings` are training flags (images_per_class=50 -> --images-per-class 50) and
    world settings (world_background_strength=0.8 -> --world background_strength=0.8), named in
    the cell's name; `data_flags` and `world` (KEY=VALUE, overridden by the world settings) are
    passed as they are."""
    flags, world = list(data_flags), list(world)
    for key, value in settings.items():
        if key.startswith("world_"):
            world.append(f"{key[6:]}={value}")
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    if world:
        flags += ["--world", *world]
    name = cell_name(method, pairs, seed, {k.removeprefix("world_"): v for k, v in settings.items()})
    return Cell(name, train_command(method, pairs, seed, flags), evals)


def probe(dataset, data_root=None, crop="center", **extra):
    """A linear-probe evaluation: (result file name, command)."""
    cmd = ["-m", "eval.linear_probe", "--checkpoint", "{run}/backbone.pth", "--dataset", dataset, "--crop", crop,
           "--out", "{result}"]
    if data_root:
        cmd += ["--data-root", data_root]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    suffix = "-".join(str(v) for v in extra.values())
    return f"linear-{dataset}{'-' + suffix if suffix else ''}-{crop}.json", cmd


def embedded_evals(world=(), invariance=True):
    """Linear probes on both transfer splits; invariance on 5 counterfactual instances per class
    (eval.invariance's default of 500 on the default 100-class world)."""
    from common.data import world_config

    evals = dict(probe("embedded", split=split) for split in ("seen", "unseen"))
    if invariance:
        evals["invariance.json"] = ["-m", "eval.invariance", "--checkpoint", "{run}/backbone.pth",
                                    "--n", str(5 * world_config(world).num_classes), "--out", "{result}"]
    return evals


def embedded_matrix(methods, world_seeds, seeds, invariance=True, **settings):
    """SP and AP for each method, plus the supervised ceiling and the random-init floor, in each
    world (its own classes) and for each pretraining seed."""
    evals = embedded_evals(settings.get("world", ()), invariance)
    runs = [(m, p) for m in methods for p in PAIRS] + [(b, None) for b in ("supervised", "random")]
    # The world seed goes last among the settings, so cell names end in -w<world>-s<seed>.
    return [cell(m, p, s, evals, **settings, world_seed=w) for m, p in runs for w in world_seeds for s in seeds]


def paper_presets(a, detection_args=(), finetune_args=()):
    """The paper's experiments on ImageNet subsets (ResNet-50, batch 256, 200 epochs by default)."""
    data = ("--data", a.imagenet, "--manifest", a.manifest) if a.imagenet else ()
    data += tuple(shlex.split(a.train_args))
    down = a.downstream

    transfer = dict(probe(d, down) for d in ("stl10", "cifar10", "cifar100"))
    stl10 = dict([probe("stl10", down)])
    # Detection fine-tunes in OUT/<cell>/detection/ and resumes there; with several GPUs under torchrun.
    launch = ["-m", "torch.distributed.run", f"--nproc-per-node={a.eval_gpus}"] if a.eval_gpus > 1 else []
    detection = {"detection-voc07.json": [*launch, "-m", "eval.detection", "--checkpoint", "{run}/backbone.pth",
                                          "--voc-root", str(a.voc_root), "--out", "{run}/detection", "--resume",
                                          "--result", "{result}", *detection_args]}
    finetune = {f"finetune-{d}.json": ["-m", "eval.finetune", "--checkpoint", "{run}/backbone.pth", "--dataset", d,
                                       "--data-root", str(down), "--resume", "--out", "{result}", *finetune_args]
                for d in ("cifar10", "cifar100", "stl10")}
    grid = [(p, s) for p in PAIRS for s in a.seeds]
    return {
        "figure4": [cell(m, p, s, transfer, data) for m in METHODS for p, s in grid],
        "table1": [cell("simclr", p, s, stl10, data, **({"epochs": e} if e != 200 else {}))
                   for e in (200, 400, 800) for p, s in grid],
        "table2": [cell("simclr", p, s, detection, data) for p, s in grid],
        "table3": [cell("dino", p, s, finetune, data, arch="vit_small_patch8", epochs=300) for p, s in grid],
        "table4": [cell("simclr", p, s, dict([probe("stl10", down), probe("stl10", down, "random")]), data)
                   for p, s in grid],
        "table5": [cell("simclr", p, s, stl10, data, **({"images_per_class": n} if n != 157 else {}))
                   for n in (50, 100, 157) for p, s in grid],
        "figure5": [cell("simclr", p, s, stl10, data, **({"transforms": t} if t != "full" else {}))
                    for t in ("full", "no_gray", "no_color", "only_crop") for p, s in grid],
    }


def world_presets(study, world_seeds, seeds, detection_args=(), finetune_args=()):
    """The paper's experiments scaled to the embedded world (README, "The paper's claims on the
    world"): its ablations on SimCLR's convnet cells of world-figure4, a resnet18 for the C4
    detector and a ViT sized for 32-px images for DINO, each with a random-init cell of the same
    backbone to show what pretraining adds. `study`: the study-wide flags and, with --epochs, the
    epochs that Table 1 multiplies; detection_args and finetune_args are added to those commands."""
    from common.data import world_config
    from common.utils import SHARED_DEFAULTS

    probes = embedded_evals(study["world"], invariance=False)

    def cells(method, evals, pairs=PAIRS, **settings):
        return [cell(method, p, s, evals, **{**study, **settings}, world_seed=w)
                for p in pairs for w in world_seeds for s in seeds]

    simclr = cells("simclr", probes)  # Figure 4's SimCLR cells, every ablation's reference
    base_epochs = study.get("epochs", SHARED_DEFAULTS["epochs"][1])
    table1 = [c for factor in (2, 4) for c in cells("simclr", probes, epochs=base_epochs * factor)]
    # The paper's 50 : 100 : 157 pairs per class, 157 being all of them.
    pairs_per_class = world_config(study["world"]).pairs_per_class
    table5 = [c for n in (50, 100) for c in cells("simclr", probes, images_per_class=round(pairs_per_class * n / 157))]
    figure5 = [c for t in ("no_gray", "no_color", "only_crop") for c in cells("simclr", probes, transforms=t)]
    random_crop = dict(probe("embedded", crop="random", split=split) for split in ("seen", "unseen"))
    table4 = cells("simclr", {**probes, **random_crop})  # the same cells, with the random-crop probes
    detection = {**probes, "detection-voc-embedded.json": [
        "-m", "eval.detection", "--checkpoint", "{run}/backbone.pth", "--voc-root", "embedded",
        "--out", "{run}/detection", "--resume", "--result", "{result}", *detection_args]}
    table2 = (cells("simclr", detection, arch="resnet18")
              + cells("random", detection, pairs=(None,), arch="resnet18"))
    finetune = {**probes, **{f"finetune-embedded-{split}.json": [
        "-m", "eval.finetune", "--checkpoint", "{run}/backbone.pth", "--dataset", "embedded", "--split", split,
        "--epochs", str(FINETUNE_EPOCHS), "--batch-size", "64", "--resume", "--out", "{result}", *finetune_args]
        for split in ("seen", "unseen")}}
    # The ViT keeps the 2 warm-up epochs its settings were calibrated with (README), not DINO's 5 on
    # the convnet; a shorter run warms up for all of its epochs, as a default warm-up would.
    table3 = (cells("dino", finetune, arch=WORLD_VIT, warmup_epochs=min(2, base_epochs))
              + cells("random", finetune, pairs=(None,), arch=WORLD_VIT))
    table = {"world-figure4": embedded_matrix(METHODS, world_seeds, seeds, **study),
             "world-table1": simclr + table1, "world-table2": table2, "world-table3": table3,
             "world-table4": table4, "world-table5": simclr + table5, "world-figure5": simclr + figure5}
    table["world-paper"] = [c for name in list(table) for c in table[name]]
    return table


def presets(a):
    detection_args, finetune_args = shlex.split(a.detection_args), shlex.split(a.finetune_args)
    table = paper_presets(a, detection_args, finetune_args)
    table["paper"] = [c for name in list(table) for c in table[name]]
    study = dict(data_flags=shlex.split(a.train_args), world=a.world or ())
    if a.epochs:
        study["epochs"] = a.epochs
    # World seed 0 is the calibration world: the world's and the world-scale training defaults were
    # chosen on it (README). Results are reported on held-out worlds, 1 and up.
    held_out = a.world_seeds or (1, 2, 3)
    table["embedded-calibration"] = embedded_matrix(METHODS, a.world_seeds or (0,), a.seeds, invariance=False,
                                                    **study)
    table.update(world_presets(study, held_out, a.seeds, detection_args, finetune_args))
    table["embedded"] = table["world-figure4"]  # `make study`
    # The demo's quick form: a contrastive and a non-contrastive method, fewer epochs, the probes alone.
    table["embedded-quick"] = embedded_matrix(("simclr", "vicreg"), a.world_seeds or (1,), a.seeds, invariance=False,
                                              **{"epochs": 8, **study})
    # SimCLR over background strength; the default, 0.2, is the `embedded` preset's.
    table["embedded-nuisance"] = [c for strength in (0.0, 0.5, 1.0) for c in embedded_matrix(
        ("simclr",), held_out, a.seeds, world_background_strength=strength, **study)]
    return table


WORLD = ("world-figure4", "world-table1", "world-table2", "world-table3", "world-table4", "world-table5",
         "world-figure5", "world-paper")
EMBEDDED = ("embedded", "embedded-quick", "embedded-nuisance", "embedded-calibration") + WORLD
# Presets that calibrate the world: their summary is eval.calibration's, without SP accuracy or Δ.
BLIND = ("embedded-calibration",)


def select(cells):
    """The cells by name, in order of first appearance. Presets share cells (SimCLR at 200 epochs
    is in Figure 4 and Tables 1, 2, 4 and 5): one cell runs the evaluations of all of them."""
    merged = {}
    for c in cells:
        if c.name not in merged:
            merged[c.name] = c
        elif merged[c.name].train != c.train:
            raise ValueError(f"two cells named {c.name} train differently")
        else:
            merged[c.name] = replace(merged[c.name], evals={**merged[c.name].evals, **c.evals})
    return list(merged.values())


# ---------------------------------------------------------------- executors

def run_local(cells, root, in_process=False, jobs=1):
    """Runs what is left of each cell, its commands one after another in the repository root (so
    the study folder is made absolute). With jobs > 1, that many cells at a time, each command's
    output going to OUT/<cell>/commands.log and each process getting its share of the cores."""
    root = Path(root).resolve()
    todo = []
    for c in cells:
        if c.commands(root):
            todo.append(c)
        else:
            print(f"[{c.name}] done", flush=True)
    if jobs == 1 or in_process:
        for c in todo:
            run_cell(c, root, in_process)
        return
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(run_cell, c, root, log=True, threads=threads) for c in todo]:
            future.result()  # a failed cell does not stop the others: its error is raised once all have run


def run_cell(c, root, in_process=False, log=False, threads=None):
    write_cell_record(c, root)
    env = {**os.environ, "OMP_NUM_THREADS": threads} if threads else None
    for cmd in c.commands(root):
        print(f"[{c.name}] python {' '.join(cmd)}", flush=True)
        if in_process:
            run_in_process(cmd)
            continue
        with open(c.folder(root) / "commands.log", "a") if log else contextlib.nullcontext() as out:
            if out:
                out.write(f"$ python {' '.join(cmd)}\n")
                out.flush()
            if subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, stdout=out, stderr=out).returncode:
                where = f": see {c.folder(root) / 'commands.log'}" if log else ""
                raise RuntimeError(f"[{c.name}] python {' '.join(cmd)} failed{where}")


def run_in_process(cmd):
    argv, cwd = sys.argv, os.getcwd()
    try:
        os.chdir(REPO)
        if cmd[0] == "-m":
            sys.argv = [cmd[1], *cmd[2:]]
            with warnings.catch_warnings():
                # An evaluation module is run again as __main__ after an earlier cell imported it;
                # runpy's warning about that is expected here: each run gets a fresh namespace.
                warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                runpy.run_module(cmd[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(cmd)
            runpy.run_path(str(REPO / cmd[0]), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"python {' '.join(cmd)} exited with {e.code}") from None
    finally:
        sys.argv = argv
        os.chdir(cwd)


def write_cell_record(c, root, slurm_jobs=None):
    """OUT/<cell>/cell.json: the cell's commands, the git commit and, for a SLURM submission, the
    job ids by stage ("train", "eval")."""
    c.folder(root).mkdir(parents=True, exist_ok=True)
    record = {"name": c.name, "train": list(c.train), "evals": c.evals, "git_commit": git_commit()}
    if slurm_jobs:
        record["slurm_jobs"] = slurm_jobs
    (c.folder(root) / "cell.json").write_text(json.dumps(record, indent=2) + "\n")


class SlurmTask:
    """A submitit job running one stage of a cell ("train": one task per GPU, each a rank of
    torch.distributed, or one task per node on a CPU partition; "eval": one task). Checkpointable:
    on preemption or timeout submitit requeues it, and the commands resume from their last
    checkpoints."""

    def __init__(self, cell, root, stage):
        self.cell, self.root, self.stage = cell, root, stage

    def __call__(self):
        import submitit

        if self.stage == "train":
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        env = dict(os.environ)
        if "SLURM_CPUS_PER_TASK" in env:  # without a cpuset torch would start a thread per core of the node
            env.setdefault("OMP_NUM_THREADS", env["SLURM_CPUS_PER_TASK"])
        cmds = self.cell.train_commands(self.root) if self.stage == "train" else self.cell.eval_commands(self.root)
        for cmd in cmds:
            subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, check=True)

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmTask(self.cell, self.root, self.stage))


def build_report(root, blind=False):
    """OUT/report/ from the results under the study folder: the paper's tables and figures
    (report.md), or for a blind study only eval.calibration's figures (calibration.md), which show
    no semantic-pair accuracy, so that whoever calibrates the world never sees Δ. Returns the file."""
    out = Path(root) / "report"
    if blind:
        from eval import calibration

        out.mkdir(parents=True, exist_ok=True)
        with open(out / "calibration.md", "w") as f, contextlib.redirect_stdout(f):
            calibration.main([str(root)])
        return out / "calibration.md"
    from eval import report

    report.main([str(root), "--out", str(out)])
    return out / "report.md"


def slurm_parameters(a, stage):
    """submitit parameters. Pretraining jobs get one task per GPU on --nodes nodes, or one task per
    node with --gpus-per-node 0; evaluation jobs one task with --eval-gpus GPUs; the report job one
    task on one CPU. Jobs without GPUs ask for no gres at all: sbatch refuses any on nodes without."""
    gpus = {"train": a.gpus_per_node, "eval": a.eval_gpus, "report": 0}[stage]
    params = dict(slurm_partition=a.partition, slurm_account=a.account, nodes=a.nodes if stage == "train" else 1,
                  tasks_per_node=max(gpus, 1) if stage == "train" else 1,
                  cpus_per_task=1 if stage == "report" else a.cpus_per_task, timeout_min=a.time,
                  slurm_array_parallelism=a.array_parallelism, slurm_signal_delay_s=a.signal_delay,
                  name=f"sempairs-{stage}")
    if gpus:
        params["gpus_per_node"] = gpus
    return params


class SlurmError(Exception):
    """SLURM refused a submission or a query; the message quotes it."""


def slurm_command(*cmd):
    """The stdout of a SLURM command; SlurmError quoting its stderr when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SlurmError(f"{cmd[0]} failed: {one_line(proc.stderr)}")
    return proc.stdout


def one_line(text):
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def sbatch_refusal(what):
    """Turns sbatch's refusal to submit `what` into a SlurmError quoting it."""
    from submitit.core.utils import FailedJobError

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error too
            yield
    except FailedJobError as e:
        raise SlurmError(f"sbatch refused the {what}: {one_line(str(e))}") from None


# SLURM's states of a job that will still run; a job that ended in one of ENDED_BADLY without a
# result from submitit was killed (scancel, a lost node).
QUEUED = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED")
RUNNING = ("RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT")
ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def slurm_states(job_ids):
    """{job id: state} of the jobs SLURM still knows: squeue's for those in its queue, else sacct's
    where accounting is on. {} where SLURM is not installed."""
    job_ids = sorted(job_ids)
    if not job_ids or not shutil.which("squeue"):
        return {}
    ids = ",".join(job_ids)
    try:
        out = slurm_command("squeue", "--noheader", "--array", "--format=%i %T", f"--jobs={ids}")
    except SlurmError as e:
        if "Invalid job id" not in str(e):  # squeue's answer when the one job asked for is forgotten
            raise
        out = ""
    states = dict(line.split() for line in out.splitlines())
    with contextlib.suppress(SlurmError, FileNotFoundError):  # accounting off, or no sacct
        out = slurm_command("sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={ids}",
                            "--format=JobID,State")
        for line in out.splitlines():
            job_id, state = line.split("|")
            states.setdefault(job_id, state.split()[0])  # "CANCELLED by 0" -> CANCELLED
    return {job_id: state for job_id, state in states.items() if job_id in job_ids}


STATES = ("done", "queued", "running", "failed", "unfinished")


@dataclass
class CellStatus:
    """Where a cell stands, one of STATES ("unfinished": nothing queued or running, and no failure
    recorded: not submitted yet, or stopped); `job` and `stage` name the job that says so, `log`
    the log of a failed job."""

    cell: Cell
    state: str
    job: str = None
    stage: str = None
    log: Path = None


def cell_status(c, root, jobs, states):
    """`jobs`: the cell's last SLURM jobs by stage; `states`: SLURM's states by job id."""
    if not c.commands(root):
        return CellStatus(c, "done")
    for stage in ("train", "eval"):
        job = jobs.get(stage)
        if job is None:
            continue
        state = states.get(job)
        if state in QUEUED or state in RUNNING:
            return CellStatus(c, "queued" if state in QUEUED else "running", job, stage)
        paths = submitit_paths(root, job)
        outcome = submitit_outcome(paths.result_pickle) or ("error" if state in ENDED_BADLY else None)
        if outcome == "error":
            return CellStatus(c, "failed", job, stage, paths.stderr)
    return CellStatus(c, "unfinished")


def submitit_paths(root, job):
    from submitit.core.utils import JobPaths

    return JobPaths(Path(root) / "slurm", job_id=job, task_id=0)


def submitit_outcome(result_pickle):
    """"success" or "error" from submitit's result file; None before the job has ended."""
    from submitit.core.utils import pickle_load

    return pickle_load(result_pickle)[0] if result_pickle.exists() else None


def read_cells(root):
    """[(cell, its last SLURM jobs by stage)] from the study folder's OUT/<cell>/cell.json files."""
    cells = []
    for path in sorted(Path(root).glob("*/cell.json")):
        record = json.loads(path.read_text())
        cells.append((Cell(record["name"], tuple(record["train"]), record["evals"]), record.get("slurm_jobs", {})))
    return cells


def study_status(root, cells_and_jobs):
    """[CellStatus] of (cell, its last SLURM jobs by stage) pairs."""
    unfinished = [jobs for c, jobs in cells_and_jobs if c.commands(root)]
    states = slurm_states({job for jobs in unfinished for job in jobs.values()})
    return [cell_status(c, root, jobs, states) for c, jobs in cells_and_jobs]


def print_status(root):
    cells_and_jobs = read_cells(root)
    try:
        statuses = study_status(root, cells_and_jobs)
    except SlurmError as e:  # SLURM is installed but does not answer: what the files say
        print(f"note: {e}; queued and running jobs look unfinished")
        statuses = [cell_status(c, root, jobs, {}) for c, jobs in cells_and_jobs]
    counts = Counter(s.state for s in statuses)
    print(f"{root}: {len(statuses)} cells: " + ", ".join(f"{counts[state]} {state}" for state in STATES))
    for s in statuses:
        job = f"  {'training' if s.stage == 'train' else 'evaluation'} job {s.job}" if s.job else ""
        log = f", log {s.log}" if s.log else ""
        print(f"{s.cell.name:48s} {s.state:10s}{job}{log}".rstrip())


@dataclass
class Submission:
    """Job ids by cell name, the report job's, and the cells left alone because their jobs are
    still queued or running."""

    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    report: str = None
    busy: list = field(default_factory=list)

    def job_ids(self):
        return [*self.train.values(), *self.eval.values(), *([self.report] if self.report else [])]


def run_slurm(cells, root, a, executor_factory=None):
    """Submits the pending work of the cells that have no job queued or running: the pretraining
    runs as one array, each cell's evaluations as a job that starts once its own task succeeded
    (and is cancelled if it fails), and a job that builds the report once all have ended. If sbatch
    refuses a job, the jobs submitted before it are cancelled and SlurmError says why. Returns a
    Submission."""
    import submitit

    root = Path(root).resolve()
    factory = executor_factory or (lambda: submitit.AutoExecutor(folder=root / "slurm", cluster="slurm"))
    recorded = dict((c.name, jobs) for c, jobs in read_cells(root))
    statuses = study_status(root, [(c, recorded.get(c.name, {})) for c in cells])
    todo = [s.cell for s in statuses if s.state in ("failed", "unfinished")]
    result = Submission(busy=[s.cell.name for s in statuses if s.state in ("queued", "running")])

    def executor(stage, dependency=None):
        ex = factory()
        ex.update_parameters(**slurm_parameters(a, stage))
        if dependency:
            ex.update_parameters(slurm_additional_parameters={"dependency": dependency, "kill_on_invalid_dep": "yes"})
        return ex

    try:
        to_train = [c for c in todo if not c.trained(root)]
        if to_train:
            with sbatch_refusal("pretraining array"):
                jobs = executor("train").submit_array([SlurmTask(c, root, "train") for c in to_train])
            result.train = {c.name: job.job_id for c, job in zip(to_train, jobs)}
        for c in todo:
            if c.pending_evals(root):
                after = f"afterok:{result.train[c.name]}" if c.name in result.train else None
                with sbatch_refusal(f"evaluation job of {c.name}"):
                    result.eval[c.name] = executor("eval", after).submit(SlurmTask(c, root, "eval")).job_id
        if todo:
            # afterany: the report also shows what finished when some cells failed.
            with sbatch_refusal("report job"):
                job = executor("report", "afterany:" + ":".join(result.job_ids())).submit(
                    build_report, root, a.preset in BLIND)
            result.report = job.job_id
    except SlurmError as e:
        if result.job_ids():
            slurm_command("scancel", *result.job_ids())
            raise SlurmError(f"{e} (cancelled the {len(result.job_ids())} jobs submitted before it)") from None
        raise
    for c in todo:
        write_cell_record(c, root, {stage: ids[c.name] for stage, ids in (("train", result.train),
                                                                          ("eval", result.eval)) if c.name in ids})
    return result


def print_submission(s, root):
    if len(s.train) == 1:  # submitit submits an array of one as a plain job
        print(f"submitted pretraining job {next(iter(s.train.values()))}")
    elif s.train:
        print(f"submitted pretraining array {next(iter(s.train.values())).split('_')[0]} ({len(s.train)} tasks)")
    for name, job in s.eval.items():
        after = f" after training {s.train[name]} succeeds" if name in s.train else ""
        print(f"submitted evaluation job {job} for {name}{after}")
    if s.report:
        print(f"submitted report job {s.report} (builds {root / 'report'} once the others have ended)")
    if s.busy:
        print(f"not submitted again, their jobs are queued or running: {', '.join(s.busy)}")
    if not (s.report or s.busy):
        print("nothing to submit: every cell is done")
        return
    if s.report:
        jobs = dict.fromkeys(job.split("_")[0] for job in s.job_ids())  # an array's tasks by the array's id
        print(f"follow them: squeue --jobs={','.join(jobs)}")
    print(f"status: python -m eval.study --status --out {root}")
    print(f"logs: {root / 'slurm'}/<job id>_0_log.out and _log.err")


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    """(flags, the preset's cells to run, study folder)."""
    p = Parser(prog="python -m eval.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="world-figure4 (= embedded), world-table1..5, world-figure5, world-paper, "
                   "embedded-quick, embedded-nuisance, embedded-calibration; on ImageNet figure4, table1..table5, "
                   "figure5, or paper (all of the paper's)")
    p.add_argument("--out", help="study folder (required, except with --list)")
    p.add_argument("--executor", choices=("local", "debug", "slurm"), default="local")
    p.add_argument("--jobs", type=POSITIVE_INT, default=1, help="local executor: cells run at a time (default 1)")
    p.add_argument("--seeds", type=SEED, nargs="+",
                   help="pretraining seeds (default 0 1 2; the embedded presets: 0, in each world)")
    p.add_argument("--cells", nargs="+", metavar="PATTERN",
                   help="only the preset's cells whose names match one of these shell patterns, e.g. 'simclr-*'")
    p.add_argument("--train-args", default="", metavar="FLAGS",
                   help='flags added to every pretraining command, e.g. --train-args="--workers 4 --batch-size 64"')
    p.add_argument("--detection-args", default="", metavar="FLAGS",
                   help='flags added to every detection command (eval.detection), e.g. --detection-args="--iters 600"')
    p.add_argument("--finetune-args", default="", metavar="FLAGS",
                   help="flags added to every fine-tuning command (eval.finetune; the world presets' "
                        f'default: --epochs {FINETUNE_EPOCHS} --batch-size 64), e.g. --finetune-args="--epochs 30"')
    p.add_argument("--list", action="store_true",
                   help="print the cells (with --out, what is left of each), then stop")
    p.add_argument("--status", action="store_true",
                   help="summarise the study folder --out (no --preset needed): cells done, queued, running, "
                        "failed (with the path of the failed job's log) and unfinished")
    embedded = p.add_argument_group("embedded presets")
    embedded.add_argument("--epochs", type=POSITIVE_INT, help="pretraining epochs (default: the scripts' default on the world)")
    embedded.add_argument("--world", nargs="+", type=world_setting, metavar="KEY=VALUE", help="world settings, e.g. num_classes=20")
    embedded.add_argument("--world-seeds", type=SEED, nargs="+", metavar="SEED",
                          help="worlds to run in (default: 1 2 3, held out from calibration; embedded-quick: 1; "
                               "embedded-calibration: 0)")
    real = p.add_argument_group("real data (paper presets)")
    real.add_argument("--imagenet", help="ImageNet train folder (ImageFolder layout)")
    real.add_argument("--manifest", help="semantic-pairs manifest (python -m common.pairs build)")
    real.add_argument("--downstream", default="data",
                      help="root holding stl10_binary/, cifar-10-batches-py/, cifar-100-python/")
    real.add_argument("--voc-root", default="data", help="root holding VOCdevkit/ (Table 2)")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--gpus-per-node", type=COUNT, default=8,
                       help="GPUs (= tasks) per node of a pretraining job; 0: a CPU job (one task, --cpus-per-task CPUs)")
    slurm.add_argument("--nodes", type=POSITIVE_INT, default=1, help="nodes per pretraining job")
    slurm.add_argument("--eval-gpus", type=COUNT, default=1, help="GPUs per evaluation job; 0: a CPU job")
    slurm.add_argument("--cpus-per-task", type=POSITIVE_INT, default=10)
    slurm.add_argument("--time", type=POSITIVE_INT, default=72 * 60, help="minutes per job (jobs requeue and resume)")
    slurm.add_argument("--signal-delay", type=POSITIVE_INT, default=120, metavar="SECONDS",
                       help="a job is told this long before its time limit to requeue itself (default 120)")
    slurm.add_argument("--array-parallelism", type=POSITIVE_INT, default=16)
    a = p.parse_args(argv)
    if a.status:
        if a.out is None:
            p.error("--status needs --out, the study folder")
        return a, None, Path(a.out).resolve()
    if not a.preset:
        p.error("give --preset (or --status to summarise a study folder)")
    if a.signal_delay >= a.time * 60:
        p.error(f"--signal-delay {a.signal_delay} s must be shorter than --time {a.time} min")
    a.seeds = a.seeds or ([0] if a.preset in EMBEDDED else [0, 1, 2])
    # Commands run in the repository root: paths given relative to here are made absolute.
    for name in ("imagenet", "manifest", "downstream", "voc_root"):
        if getattr(a, name):
            setattr(a, name, os.path.abspath(getattr(a, name)))
    table = presets(a)
    if a.preset not in table:
        p.error(f"unknown preset {a.preset!r}; choose from {', '.join(table)}")
    if a.preset not in EMBEDDED:
        if a.epochs or a.world or a.world_seeds:
            p.error("--epochs, --world and --world-seeds apply to the embedded presets; the paper's set their own epochs")
        if not (a.imagenet and a.manifest) and not a.list:
            p.error("the paper's presets train on ImageNet: give --imagenet and --manifest")
    if a.out is None and not a.list:
        p.error("--out is required (the study folder); only --list can do without it")
    cells, root = select(table[a.preset]), Path(a.out).resolve() if a.out else None
    if a.cells:
        cells = [c for c in cells if any(fnmatch(c.name, pattern) for pattern in a.cells)]
        if not cells:
            p.error(f"no cell of {a.preset} matches {' '.join(a.cells)} (--list shows them)")
    return a, cells, root


def main(argv=None):
    a, cells, root = parse_args(argv)
    if a.status:
        if not root.is_dir():
            fail(f"no study folder {root}")
        print_status(root)
        return
    if a.list:
        for c in cells:
            if root is None:  # no study folder: the cells alone
                print(c.name)
                continue
            left = len(c.commands(root))
            print(f"{c.name:48s} {'done' if not left else f'{left} command(s) left'}")
        return
    root.mkdir(parents=True, exist_ok=True)
    if a.executor == "slurm":
        if not shutil.which("sbatch"):
            fail("--executor slurm needs SLURM's sbatch, which is not on PATH")
        try:
            submission = run_slurm(cells, root, a)
        except SlurmError as e:
            fail(e)
        print_submission(submission, root)
        if submission.report or submission.busy:
            return
    else:
        run_local(cells, root, in_process=a.executor == "debug", jobs=a.jobs)
    print(build_report(root, a.preset in BLIND).read_text())


def fail(message):
    """Bad input or a refusal: one line and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    # Run as the module eval.study, not as __main__: the pickles of SLURM jobs then name eval.study's
    # classes, which the jobs import, instead of carrying a copy of this file's code.
    from eval.study import main as study_main

    study_main()
