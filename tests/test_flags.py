"""Every numeric flag of every training script and evaluation command is range-checked as it is
parsed: an out-of-range value ends the command with exit status 2 and one line naming the flag, the
value and what is allowed; the range's edge (a documented special value such as 0 = never among
them) is accepted. Checks that involve several flags run before any work starts, too."""
import pytest

import byol
import dino
import simclr
import vicreg
from common import flags, utils
from eval import baselines, detection, export_detectron2, finetune, invariance, knn, linear_probe, report, study
from eval import voc_world


class Captured(Exception):
    pass


def capture_parser(monkeypatch, entry, argv):
    """The flags.Parser that `entry(argv)` builds, caught as it starts parsing."""
    def stop(self, *args, **kwargs):
        raise Captured(self)

    with monkeypatch.context() as m:
        m.setattr(flags.Parser, "parse_args", stop)
        with pytest.raises(Captured) as caught:
            entry(argv)
    return caught.value.args[0]


def parsers(monkeypatch):
    """(name, parser, argv its required arguments need) of every training script and evaluation command."""
    out = [(f"{script.__name__}.py", utils.base_parser(script.__name__, script.DEFAULTS), ["--pairs", "semantic"])
           for script in (simclr, vicreg, byol, dino)]
    out.append(("eval.baselines", utils.base_parser("supervised", baselines.DEFAULTS, prog="baselines"), []))
    for module, entry, argv in [(linear_probe, linear_probe.main, []), (knn, knn.main, []),
                                (finetune, finetune.main, []), (invariance, invariance.main, []),
                                (detection, detection.parse_args, []), (study, study.parse_args, []),
                                (report, report.main, []), (export_detectron2, export_detectron2.main, []),
                                (voc_world, voc_world.main, [])]:
        parser = capture_parser(monkeypatch, entry, argv)
        out.append((module.__name__, parser, required_argv(parser)))
    return out


def required_argv(parser):
    argv = []
    for action in parser._actions:
        if not action.option_strings:  # positional
            argv.append("x")
        elif action.required:
            argv += [action.option_strings[-1], "x"]
    return argv


def edge_values(bounds):
    """(out-of-range values, accepted edge value) of a flags.bounded type."""
    kind, low, high, low_open, high_open = bounds
    bad = ["abc"]
    if low is not None:
        bad.append(str(low if low_open else low - 1))
    if high is not None:
        bad.append(str(high if high_open else kind(high + 1)))
    if low is not None and not low_open:
        good = low
    elif high is not None and not high_open:
        good = high
    else:
        good = low + 1 if high is None else (low + high) / 2
    return bad, str(good)


def numeric_flags(monkeypatch):
    for name, parser, argv in parsers(monkeypatch):
        for action in parser._actions:
            if action.option_strings and hasattr(action.type, "bounds"):
                yield name, parser, argv, action


def test_no_flag_takes_an_unchecked_number(monkeypatch):
    """A bare int or float type would let -1 or nan through to the work."""
    unchecked = [(name, action.option_strings[-1]) for name, parser, _ in parsers(monkeypatch)
                 for action in parser._actions if action.type in (int, float)]
    assert unchecked == []
    assert len(list(numeric_flags(monkeypatch))) >= 100  # the five training entry points and ten commands


def parse_error(parser, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    return exit_.value.code, err


def test_every_numeric_flag_refuses_out_of_range_values_in_one_line_and_accepts_its_edge(monkeypatch, capsys):
    checked = 0
    for name, parser, argv, action in numeric_flags(monkeypatch):
        flag = action.option_strings[-1]
        bad, good = edge_values(action.type.bounds)
        for value in bad:
            code, err = parse_error(parser, [*argv, flag, value], capsys)
            assert code == 2, (name, flag, value)
            assert err.count("\n") == 1 and err.startswith(f"error: {flag} must be ") and value in err, (name, err)
        parsed = parser.parse_args([*argv, flag, good])
        expected = action.type(good)
        value = getattr(parsed, action.dest)
        assert (value[0] if action.nargs in ("+", "*") else value) == expected, (name, flag)
        checked += 1
    assert checked >= 100


@pytest.mark.parametrize("name, argv, message", [
    ("simclr.py", ["--batch-size", "1"], "--batch-size must be a multiple of the 1 process(es) with at least 2 pairs"),
    ("vicreg.py", ["--arch", "vit_small_patch8", "--img-size", "36"], "--img-size must be a multiple of 8"),
    ("simclr.py", ["--arch", "resnet18", "--width", "32"], "--width sets the convnet's width; resnet18 has its own"),
    ("byol.py", ["--epochs", "3", "--warmup-epochs", "4"], "--warmup-epochs must be at most --epochs (3), got 4"),
    ("dino.py", ["--epochs", "2", "--freeze-last-layer", "3"], "--freeze-last-layer must be at most --epochs (2)"),
    ("dino.py", ["--epochs", "2", "--teacher-temp-warmup-epochs", "5"], "--teacher-temp-warmup-epochs must be at most"),
    ("byol.py", ["--init-backbone", "missing.pth"], "--init-backbone: no such file: missing.pth"),
    ("vicreg.py", ["--world", "no_such_setting=1"], "--world unknown world setting 'no_such_setting'"),
    ("dino.py", ["--world", "background_strength=strong"], "--world background_strength must be a number"),
    ("simclr.py", ["--optimizer", "adam"], "--optimizer invalid choice: 'adam'"),
    ("dino.py", ["--bn-in-head", "maybe"], "--bn-in-head must be true or false, got 'maybe'"),
    ("vicreg.py", ["--expander", "8192-x"], "--expander must be positive integers joined by '-'"),
    ("simclr.py", ["--device", "cuda:7"], "--device must be"),
    ("simclr.py", ["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
])
def test_training_flags_that_depend_on_each_other_fail_before_any_work(name, argv, message, capsys, tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = {"simclr.py": simclr, "vicreg.py": vicreg, "byol.py": byol, "dino.py": dino}[name]
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--pairs", "semantic", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_default_warmup_longer_than_a_short_run_is_cut_not_refused():
    args = simclr.parse_args(["--pairs", "semantic", "--epochs", "1"])  # the world's warm-up is 2 epochs
    assert (args.epochs, args.warmup_epochs) == (1, 2)


def test_documented_zero_values_are_accepted():
    args = dino.parse_args(["--pairs", "semantic", "--clip-grad", "0", "--freeze-last-layer", "0", "--workers", "0",
                            "--checkpoint-every", "0", "--eval-every", "0", "--warmup-epochs", "0", "--lr", "0",
                            "--teacher-temp-warmup-epochs", "0", "--local-crops", "0"])
    assert (args.clip_grad, args.freeze_last_layer, args.eval_every, args.lr) == (0.0, 0, 0, 0.0)


def test_study_list_needs_no_study_folder_and_the_rest_does(capsys):
    study.main(["--preset", "paper", "--list"])
    names = capsys.readouterr().out.split()
    assert "simclr-semantic-s0" in names and len(names) == len(set(names)) > 20
    with pytest.raises(SystemExit) as exit_:
        study.parse_args(["--preset", "embedded"])
    assert exit_.value.code == 2 and "--out is required" in capsys.readouterr().err
