"""The equal-budget and fidelity options reach the library the same way from the CLI, conf/ and params."""
from pathlib import Path

import pytest
import yaml

from flap_exp.cli import _parser
from flap_exp.errors import FlapError
from flap_exp.pipeline.study.compose import check_structure_options
from flap_exp.pipeline.study.settings import structure_options as options
from flap_exp.structures import StructureOptions

CONF = Path(__file__).resolve().parents[1] / "conf" / "structure"


def test_cli_defaults_are_the_library_defaults_and_flags_parse():
    a = _parser().parse_args(["prune", "--out", "x"])
    default = StructureOptions()
    assert (a.ul_rounding, a.head_cost) == (default.ul_rounding, default.head_cost) == ("fill", "exact")
    a = _parser().parse_args(["prune", "--out", "x", "--ul-rounding", "floor", "--head-cost", "official"])
    assert (a.ul_rounding, a.head_cost) == ("floor", "official")
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["prune", "--out", "x", "--ul-rounding", "round"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", ["ul_um", "ul_mm", "al_mm", "al_am"])
def test_conf_structures_give_the_library_defaults(name):
    opts = options(yaml.safe_load((CONF / f"{name}.yaml").read_text()))
    assert opts == StructureOptions()


def test_pipeline_options_pass_both_modes_and_refuse_bad_ones():
    assert options({"ul_rounding": "floor", "head_cost": "official"}) == StructureOptions(ul_rounding="floor",
                                                                                           head_cost="official")
    with pytest.raises(FlapError, match="structures.ul_um: ul_rounding must be one of fill, floor; got 'round'"):
        check_structure_options({"ul_um": {"ul_rounding": "round"}, "al_am": {}})
    with pytest.raises(FlapError, match="structures.al_am: head_cost must be one of exact, official"):
        check_structure_options({"al_am": {"head_cost": 170}})
