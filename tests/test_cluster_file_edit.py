"""`speed plan --write`'s copy: other stages, the same comments and layout, written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.core.cluster_file import load_cluster
from runtime.core.cluster_file_edit import with_stages, write_with_stages
from runtime.core.errors import SpeedError

LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "local.yaml"


def test_only_the_stages_change_and_every_comment_stays():
    text = LOCAL.read_text()
    edited = with_stages(text, {"edge-1": [0, 1], "edge-2": [], "edge-3": [2]})
    changed = [(a, b) for a, b in zip(text.splitlines(), edited.splitlines()) if a != b]
    assert len(text.splitlines()) == len(edited.splitlines())
    assert changed == [("    stages: [0]", "    stages: [0, 1]"), ("    stages: [1]", "    stages: []")]
    assert [line for line in edited.splitlines() if "#" in line] == [line for line in text.splitlines() if "#" in line]


def test_a_block_list_and_a_comment_after_the_value_are_kept(tmp_path):
    text = LOCAL.read_text().replace("    stages: [2]\n", "    stages:   # the last\n      - 2\n    # after\n")
    edited = with_stages(text, {"edge-3": [1, 2]})
    assert "    stages:   # the last\n      [1, 2]\n    # after\n" in edited
    (tmp_path / "c.yaml").write_text(edited)
    assert load_cluster(tmp_path / "c.yaml").node("edge-3").stages == (1, 2)


def test_the_copy_is_written_beside_the_file_and_never_over_another(tmp_path):
    source = tmp_path / "cluster.yaml"
    source.write_text(LOCAL.read_text())
    write_with_stages(source, tmp_path / "planned.yaml", {"edge-2": [1, 2], "edge-3": []})
    planned = load_cluster(tmp_path / "planned.yaml")
    assert [node.stages for node in planned.nodes] == [(0,), (1, 2), ()]
    with pytest.raises(SpeedError, match="planned.yaml exists; give the name of a new file"):
        write_with_stages(source, tmp_path / "planned.yaml", {"edge-2": [1]})
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SpeedError, match="write the copy beside"):
        write_with_stages(source, tmp_path / "elsewhere" / "planned.yaml", {"edge-2": [1]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml", "elsewhere", "planned.yaml"]
