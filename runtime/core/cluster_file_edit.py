"""A copy of a cluster file whose nodes run other stages, with every comment and the layout kept: only the
text of each node's `stages` value is replaced (`speed plan --write`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from runtime.core.cluster_file import load_cluster
from runtime.core.errors import SpeedError


def with_stages(text: str, stages: Mapping[str, Sequence[int]]) -> str:
    """The cluster file's text with each named node's stages replaced (as a flow list, e.g. [0, 1])."""
    root = yaml.compose(text)
    nodes = next(value for key, value in root.value if key.value == "nodes")
    spans = []
    for entry in nodes.value:
        fields = {key.value: value for key, value in entry.value}
        name = fields["name"].value
        if name in stages:
            value = fields["stages"]
            # a block list ends where the next key starts, after comments and indentation: stop at its last item
            end = value.end_mark.index if value.flow_style or not value.value else value.value[-1].end_mark.index
            spans.append((value.start_mark.index, end, f"[{', '.join(map(str, stages[name]))}]"))
    for start, end, replacement in sorted(spans, reverse=True):  # from the end: earlier offsets stay true
        text = text[:start] + replacement + text[end:]
    return text


def write_with_stages(source: Path, target: Path, stages: Mapping[str, Sequence[int]]) -> None:
    """Write the copy to target, whole or not at all; the source must be a valid cluster file (load_cluster),
    and the copy is checked the same way before it is kept."""
    load_cluster(source)
    if target.resolve().parent != source.resolve().parent:
        raise SpeedError(f"write the copy beside {source} (in {source.resolve().parent}): the paths in a cluster file "
                         "are relative to it")
    if target.exists():
        raise SpeedError(f"{target} exists; give the name of a new file for the copy")
    text = with_stages(source.read_text(), stages)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        out.write(text)
    try:
        load_cluster(out.name)
        os.link(out.name, target)  # fails if the target appeared meanwhile: never overwrite
    finally:
        os.unlink(out.name)
