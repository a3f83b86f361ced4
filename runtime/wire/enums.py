"""The core's word enums (StopReason, NodeState) as protobuf enums: a member NAME travels as the wire
enum's PREFIX_NAME value (STOP_REASON_EOS), so each side keeps its own idiom and neither parses text."""

from __future__ import annotations

import re
from enum import Enum
from typing import TypeVar

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from runtime.core.errors import SpeedError
from runtime.core.node_state import NodeState
from runtime.wire import speed_pb2 as pb

E = TypeVar("E", bound=Enum)


def _prefix(wire_enum: EnumTypeWrapper) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", wire_enum.DESCRIPTOR.name).upper()


def to_wire(member: Enum, wire_enum: EnumTypeWrapper) -> int:
    return wire_enum.Value(f"{_prefix(wire_enum)}_{member.name}")


def from_wire(value: int, wire_enum: EnumTypeWrapper, core_enum: type[E]) -> E:
    """SpeedError when the value is unknown here or unset (a peer of another version)."""
    name = wire_enum.Name(value) if value in wire_enum.values() else ""
    member = core_enum.__members__.get(name.removeprefix(f"{_prefix(wire_enum)}_"))
    if member is None:
        raise SpeedError(f"the peer sent {wire_enum.DESCRIPTOR.name} {value}, which this version does not know; "
                         "run the same version of SPEED on every machine")
    return member


def node_state_of(node: pb.NodeStatus) -> NodeState:
    return from_wire(node.state, pb.NodeState, NodeState)
