"""Command-line flags checked before any work starts. `Parser` ends every bad command line with
one line, `error: --FLAG ...` naming the flag, the value and what is allowed, and exit status 2
(argparse's own usage-and-message form, also 2, becomes that one line). The types below parse a
number and check its range as argparse reads it; `fail` reports checks that need several flags.
"""
import argparse
import math
import re
import sys

import torch


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse says "argument --lr: ..." (or "argument -h/--help: ..."): name the long flag alone.
        fail(re.sub(r"^argument (?:\S+/)?(\S+?): ", r"\1 ", message))


def fail(message):
    """Ends the command: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float), finite, within the bounds (open or closed)."""
    if low is not None and high is not None:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low}"
    else:
        allowed = f"{'<' if high_open else '<='} {high}"
    noun = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {allowed}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and (value > high or (high_open and value == high))):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {allowed}"
    parse.bounds = (kind, low, high, low_open, high_open)  # for the tests
    return parse


POSITIVE_INT = bounded(int, 1)
COUNT = bounded(int, 0)  # zero allowed, for flags where 0 has a documented meaning
SEED = bounded(int, 0, 2**32 - 1)  # NumPy's seeds
POSITIVE = bounded(float, 0, low_open=True)
NON_NEGATIVE = bounded(float, 0)
FRACTION = bounded(float, 0, 1, low_open=True)  # (0, 1]: an area fraction
MOMENTUM = bounded(float, 0, 1)  # [0, 1]


def boolean(text):
    """An argparse type: true/false or 1/0."""
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")
    return text.lower() in ("true", "1")


def layer_widths(text):
    """An argparse type: widths joined by '-', each a positive integer (e.g. 8192-8192-8192)."""
    if not re.fullmatch(r"[1-9][0-9]*(-[1-9][0-9]*)*", text):
        raise argparse.ArgumentTypeError(f"must be positive integers joined by '-' (e.g. 8192-8192-8192), got {text!r}")
    return text


def device(text):
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:N)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"must be a device this machine has: {text} is not available")
    return text


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"
