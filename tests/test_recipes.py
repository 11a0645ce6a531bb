"""The scripts' real-data defaults, tests/recipes.json and RECIPES.md's tables say the same: a
changed default fails here until the table (with its source) and the JSON are updated too."""
import json
import re
from pathlib import Path

import pytest

import byol
import dino
import simclr
import vicreg
from common import utils
from eval import baselines

ROOT = Path(__file__).resolve().parents[1]
RECIPES = json.loads((ROOT / "tests" / "recipes.json").read_text())


def real_defaults(defaults):
    return {flag: real for flag, (real, _) in {**utils.SHARED_DEFAULTS, **defaults}.items()}


SCRIPTS = {"simclr": real_defaults(simclr.DEFAULTS), "vicreg": real_defaults(vicreg.DEFAULTS),
           "byol": real_defaults(byol.DEFAULTS), "dino": real_defaults(dino.DEFAULTS),
           "dino_vit": dino.VIT_RECIPE, "supervised": real_defaults(baselines.DEFAULTS)}


def markdown_tables():
    """{recipe: {flag: value cell}} from RECIPES.md's sections headed '... recipe `NAME` ...'."""
    tables, current = {}, None
    for line in (ROOT / "RECIPES.md").read_text().splitlines():
        heading = re.match(r"#+ .*recipe `(\w+)`", line)
        if heading:
            current = tables.setdefault(heading.group(1), {})
        elif line.startswith("#"):
            current = None
        elif current is not None and (row := re.match(r"\| `--([\w-]+)` \| ([^|]*) \|", line)):
            current[row.group(1).replace("-", "_")] = row.group(2).strip()
    return tables


def cell_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def test_recipes_json_lists_every_real_data_default_of_every_script():
    assert RECIPES == SCRIPTS


@pytest.mark.parametrize("recipe", SCRIPTS)
def test_recipes_md_has_a_row_with_our_value_for_every_default(recipe):
    table = markdown_tables()[recipe]
    assert set(table) == set(RECIPES[recipe])
    for flag, value in RECIPES[recipe].items():
        assert cell_value(table[flag]) == value, f"RECIPES.md, recipe {recipe}, --{flag}: {table[flag]} != {value}"
