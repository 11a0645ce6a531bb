"""README's commands run as shown. Every command of README's fenced code blocks is run, in a
scratch folder holding a pairs.csv (157 pairs of each of two classes, the paper's count), mapped to a form that runs on this
machine by these rules, in order:

1. Optional parts in [brackets] are left out.
2. `pip install ...`, and a cluster's setup (`sudo tests/slurm/start_slurm.sh`, `export SLURM_CONF=...`):
   not run (installing is what `make install`, which the suite runs on, does; the SLURM tier,
   tests/test_slurm.py, starts the cluster).
3. `make TARGET`: `make -n TARGET` in the repository, a dry run: the target exists and its recipe expands.
4. A command that needs what this machine does not have: a placeholder in capitals (IMAGENET,
   DATA, RUN, VOC, ...), a cluster (`--executor slurm`, `torchrun`), or an input file or folder
   that is not here (e.g. runs/study, which `make study` writes): its entry point with `--help`
   (`python -m common.pairs build --help`, `python vicreg.py --help`).
5. A study without `--list`: with `--list` added (its cells are checked and listed; running them
   takes minutes to hours).
6. A training script on the embedded world: as shown, plus `--epochs 1 --images-per-class 2
   --workers 0 --out TMP` (the last value of a flag wins), so that it trains one step.
7. Anything else: as shown.
Each must exit 0.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"simclr.py", "vicreg.py", "byol.py", "dino.py"}
PLACEHOLDER = re.compile(r"(?<![\w-])[A-Z][A-Z0-9_]+(?![\w-])")


def readme_commands():
    """The commands of README's fenced code blocks (not those fenced as ```text, which show output):
    continuation lines joined, comments dropped."""
    commands, block, output, joined = [], False, False, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            block, output = not block, line.strip() == "```text"
            continue
        if not block or output:
            continue
        joined += line.rstrip().removesuffix("\\")
        if line.rstrip().endswith("\\"):
            continue
        command = joined.split(" #")[0].strip()
        joined = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


OUTPUT_FLAGS = ("--out", "--result")


def looks_like_path(word):
    return not word.startswith("-") and "=" not in word and "*" not in word and \
        ("/" in word or re.search(r"\.[a-z]+$", word) is not None)


def entry_point(words):
    """The program part of a command: python SCRIPT or python -m MODULE, and a subcommand if any."""
    if "-m" in words:
        i = words.index("-m")
        entry, rest = ["python", "-m", words[i + 1]], words[i + 2:]
    else:
        script = next(w for w in words if w.endswith(".py"))
        entry, rest = ["python", script], words[words.index(script) + 1:]
    if rest and re.fullmatch(r"[a-z]+", rest[0]):  # e.g. common.pairs build
        entry.append(rest[0])
    return entry


def set_up(command):
    """An installation or cluster set-up line (rule 2): `make install` and the SLURM tier run those."""
    return command.split()[0] in ("pip", "sudo", "export")


def runnable(command, workdir):
    """The argv run for a README command (rules in the module docstring)."""
    command = re.sub(r"\s\[[^]]*\]", "", command)
    words = shlex.split(command)
    if words[0] == "make":
        return ["make", "-C", str(ROOT), "-n", *words[1:]]
    words = [str(ROOT / w) if w in TRAINING else w for w in words]
    missing = [w for flag, w in zip([""] + words, words)
               if looks_like_path(w) and flag not in (*OUTPUT_FLAGS, "-m") and not (workdir / w).exists()]
    if PLACEHOLDER.search(command) or "--executor slurm" in command or words[0] == "torchrun" or missing:
        return [*entry_point(words), "--help"]
    if words[:3] == ["python", "-m", "eval.study"] and "--list" not in words:
        words.append("--list")
    if len(words) > 1 and Path(words[1]).name in TRAINING:
        words += ["--epochs", "1", "--images-per-class", "2", "--workers", "0", "--out", str(workdir / "run")]
    return words


COMMANDS = readme_commands()


def test_readme_has_commands_to_check():
    assert any("eval.study --preset paper --list" in c for c in COMMANDS) and len(COMMANDS) > 10


@pytest.mark.parametrize("command", [c for c in COMMANDS if not set_up(c)])
def test_readme_command_runs(command, tmp_path, world_cache):
    rows = [f"n0{c},n0{c}/a{i}.JPEG,n0{c}/b{i}.JPEG" for c in range(2) for i in range(157)]
    (tmp_path / "pairs.csv").write_text("\n".join(["class,image_a,image_b", *rows]) + "\n")
    argv = runnable(command, tmp_path)
    argv = [sys.executable if word == "python" else word for word in argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # python -m from the scratch folder
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stderr[-2000:]}"
