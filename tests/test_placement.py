"""Where stages go when nodes come and go: the coordinator's placement rule alone."""

from runtime.core.placement import place

HOME = {"edge-1": [0], "edge-2": [1], "edge-3": [2]}
ANY = {name: frozenset({0, 1, 2}) for name in HOME}  # a weight-shared bundle: one graph for every stage


def test_every_stage_stays_with_its_own_node_while_it_serves():
    assert place(HOME, ANY, ["edge-1", "edge-2", "edge-3"], 3) == {0: "edge-1", 1: "edge-2", 2: "edge-3"}


def test_a_lost_middle_stage_goes_to_a_neighbour_first_in_file_order():
    assert place(HOME, ANY, ["edge-1", "edge-3"], 3) == {0: "edge-1", 1: "edge-1", 2: "edge-3"}


def test_a_lost_last_stage_goes_to_the_node_running_the_stage_before_it():
    assert place(HOME, ANY, ["edge-1", "edge-2"], 3) == {0: "edge-1", 1: "edge-2", 2: "edge-2"}


def test_one_node_left_runs_every_stage():
    assert place(HOME, ANY, ["edge-3"], 3) == {0: "edge-3", 1: "edge-3", 2: "edge-3"}


def test_a_stage_nobody_holds_the_graph_of_is_left_out():
    own_only = {name: frozenset(stages) for name, stages in HOME.items()}
    assert place(HOME, own_only, ["edge-1", "edge-3"], 3) == {0: "edge-1", 2: "edge-3"}


def test_a_standby_node_takes_the_stages_it_holds():
    home = {**HOME, "spare": []}
    can_run = {**{name: frozenset(stages) for name, stages in HOME.items()}, "spare": frozenset({1, 2})}
    assert place(home, can_run, ["edge-1", "edge-3", "spare"], 3) == {0: "edge-1", 1: "spare", 2: "edge-3"}


def test_an_idle_standby_is_preferred_to_a_busy_neighbour():
    home = {**HOME, "spare": []}
    can_run = {name: frozenset({0, 1, 2}) for name in home}
    assert place(home, can_run, ["edge-1", "edge-3", "spare"], 3) == {0: "edge-1", 1: "spare", 2: "edge-3"}


def test_the_node_with_fewer_stages_is_preferred_then_a_neighbour():
    home = {"a": [0, 1], "b": [2], "c": [3], "d": [4]}
    can_run = {name: frozenset(range(5)) for name in home}
    # stage 2 lost: c (stage 3) and d (stage 4) run one stage each, a runs two; c is the neighbour
    assert place(home, can_run, ["a", "c", "d"], 5) == {0: "a", 1: "a", 2: "c", 3: "c", 4: "d"}


def test_nothing_serving_places_nothing():
    assert place(HOME, ANY, [], 3) == {}
