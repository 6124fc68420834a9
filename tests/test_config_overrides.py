"""Command-line overrides of list entries (issue #17, item 5) and one-line CLI errors (item 6)."""

from pathlib import Path

import pytest

from ovd.config import load_config
from ovd.errors import OVDError
from ovd.utils.cli import run_cli

REPO = Path(__file__).parents[1]
PIS = REPO / "configs/coco/pis.yaml"


def test_one_list_entry_is_overridden_by_index():
    cfg = load_config(PIS, ["data.sources[1].min_size=[320]", "data.sources.0.max_size=500"])
    assert [(s.min_size, s.max_size) for s in cfg.data.sources] == [([800], 500), ([320], 667)]
    assert [s.dataset for s in cfg.data.sources] == ["coco_ovd_train", "coco_captions_train_pseudo"]


def test_every_list_entry_is_overridden_by_star_in_order():
    cfg = load_config(PIS, ["data.sources[*].min_size=[128]", "data.sources[1].min_size=[96]", "solver.max_iter=3"])
    assert [s.min_size for s in cfg.data.sources] == [[128], [96]]
    assert cfg.solver.max_iter == 3
    assert load_config(REPO / "configs/coco/base.yaml", ["data.sources[*].min_size=[1]"]).data.sources == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.sources[2].min_size=[1]", "data.sources[2].min_size: index 2 out of range: data.sources has 2"),
        ("data.sources[1].min_siz=[1]", "did you mean 'data.sources[1].min_size'"),
        ("data.sources[1].min_size=abc", "data.sources[1].min_size: invalid value"),
        ("solver.max_iter[0]=1", "solver.max_iter is not a list"),
        ("data.soures[1].x=1", "unknown config key 'data.soures'"),
        ("data.sources={a: 1}", "invalid value"),
        ("data.sources[x]=1", "malformed key"),
    ],
)
def test_bad_list_overrides_are_one_clear_error(override, message):
    with pytest.raises(OVDError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")) as e:
        load_config(PIS, [override])
    assert "\n" not in str(e.value)


def test_a_diverged_training_is_one_cli_line(capsys):
    def main(argv):
        raise FloatingPointError("loss became nan at iteration 3: loss_cls=nan; lower solver.base_lr")

    assert run_cli(main) == 3
    err = capsys.readouterr().err
    assert err == "error: loss became nan at iteration 3: loss_cls=nan; lower solver.base_lr\n"
