"""Scoring texts that share prefixes (an n-best list) without computing a shared prefix twice.

To score a text the language model reads ``<eos> w1 … wn-1`` and reads off, after each of those
tokens, the log-probability of the next one. Texts that begin with the same tokens have the same
LSTM state and the same distribution at every position of that common beginning, so `plan_scoring`
builds a trie of the texts' input tokens and cuts it into *segments*: maximal chains of trie nodes
without a branch. Each segment runs once, from its parent segment's final state, and at each of
its positions every text passing through reads the log-probability of its own next token.

Segments run in *rounds*: a segment's parent finishes in the round before it. A segment with
children must hand on its exact final state, so it shares an onnxruntime call only with segments
of the same length (padding would run into the state); a leaf segment needs no final state and
can be padded. ``app.scheduler`` runs the rounds; ``LanguageModelRuntime.score_segments`` is the
one-call primitive.

Sharing is not free: each level of the trie is a round trip through the inference thread, and an
LSTM call costs per position whatever its batch (its steps run one after another), so many small
calls can cost more than one padded call of every text. `plan_scoring` therefore cuts the trie
after the number of rounds that `estimated_cost` finds cheapest: below the cut, each remaining path
is its own leaf, all in one padded call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# `estimated_cost`'s units: one row's work at one position. Measured on the shipped 2x650 model.
STEP_COST = 3.3  # a position of a call, whatever its rows (sequential LSTM steps, recurrent weights read)
# One more onnxruntime call and round trip through the inference thread, which also waits for the
# round before it: set from `python -m bench --nbest` so that plans saving only a few positions
# (hypotheses that differ anywhere) stay one padded call; with 2.0 they ran 6% slower than it.
CALL_COST = 10.0


@dataclass
class Segment:
    """``tokens`` read from the final state of segment ``parent`` (None: from the zero state);
    ``reads[p]`` are the distinct token ids whose log-probability is wanted after ``tokens[p]``.
    ``branches``: segments continue from this one's final state."""

    tokens: list[int]
    parent: int | None
    reads: list[list[int]] = field(default_factory=list)
    branches: bool = False


@dataclass(frozen=True)
class ScorePlan:
    """The segments to run (``rounds``, indices into ``segments``, each round after the one
    before) and, for each text, the (segment, position) of each of its targets in order."""

    segments: list[Segment]
    rounds: list[list[int]]
    paths: list[list[tuple[int, int]]]

    @property
    def positions(self) -> int:
        """Token positions the plan makes onnxruntime compute."""
        return sum(len(s.tokens) for s in self.segments)

    def assemble(self, values: Sequence[Sequence[dict[int, float]]],
                 targets: Sequence[Sequence[int]]) -> list[list[float]]:
        """Each text's target log-probabilities, in order, from ``values[segment][position]`` (token
        id -> log-probability for that segment's reads)."""
        return [[values[s][p][t] for (s, p), t in zip(path, target, strict=True)]
                for path, target in zip(self.paths, targets, strict=True)]


def plan_scoring(targets: Sequence[Sequence[int]], start_id: int, share: bool = True) -> ScorePlan:
    """The plan that scores each of ``targets`` (token ids, each read after ``start_id`` and the
    targets before it). With ``share``, the cheapest by `estimated_cost` of the trie cut after
    0, 1, 2, … rounds (`_cut_trie`); without, one segment per text from the zero state. Empty
    targets read nothing."""
    inputs = [[start_id, *target[:-1]] if target else [] for target in targets]
    if not share or len(targets) < 2:
        return _flat_plan(inputs, targets)
    top, walks = _trie(inputs, targets)
    if sum(map(len, inputs)) - len({id(node) for walk in walks for node in walk}) < CALL_COST:
        # Sharing would save fewer positions than one more call costs, so no cut of the trie is worth
        # working out, which costs event-loop time on every request (most requests' texts share nothing
        # but <eos>).
        return _flat_plan(inputs, targets)
    cuts = []
    for depth in range(max(map(len, inputs)) + 1):
        cuts.append(_cut_trie(top, walks, depth))
        if len(cuts[-1].rounds) <= depth:  # the whole trie: cutting deeper changes nothing
            break
    return min(cuts, key=estimated_cost)  # the first of equals: the fewest rounds


def estimated_cost(plan: ScorePlan) -> float:
    """What running ``plan`` costs, in units of one row's work at one position. A call of ``rows``
    padded to ``width`` positions costs ``width * (STEP_COST + rows)`` plus ``CALL_COST``: the LSTM
    runs its positions one after another whatever the batch, and reads its recurrent weights at
    each (measured on the shipped 2x650 model, one thread: 1.04 ms a position for 1 row, 1.65 for 4,
    4.6 for 16, i.e. about 0.8 ms + 0.24 ms per row). Segments that others continue from are
    grouped by length, the rest of a round is one padded call, as ``app.scheduler`` runs them."""
    cost = 0.0
    for indices in plan.rounds:
        calls: dict[int | None, list[int]] = {}
        for index in indices:
            segment = plan.segments[index]
            calls.setdefault(len(segment.tokens) if segment.branches else None, []).append(
                len(segment.tokens))
        for lengths in calls.values():
            cost += CALL_COST + max(lengths) * (STEP_COST + len(lengths))
    return cost


def _flat_plan(inputs: list[list[int]], targets: Sequence[Sequence[int]]) -> ScorePlan:
    segments: list[Segment] = []
    paths: list[list[tuple[int, int]]] = []
    for tokens, target in zip(inputs, targets, strict=True):
        if tokens:
            segments.append(Segment(tokens, None, [[t] for t in target]))
        paths.append([(len(segments) - 1, p) for p in range(len(tokens))])
    return ScorePlan(segments, [list(range(len(segments)))] if segments else [], paths)


@dataclass
class _Node:
    token: int
    children: dict[int, _Node] = field(default_factory=dict)
    reads: dict[int, None] = field(default_factory=dict)  # an ordered set


def _trie(inputs: list[list[int]], targets: Sequence[Sequence[int]]) -> tuple[dict[int, _Node], list[list[_Node]]]:
    """The trie of the texts' input tokens (each node records the targets read after it) and
    each text's walk down it."""
    top: dict[int, _Node] = {}
    walks: list[list[_Node]] = []
    for tokens, target in zip(inputs, targets, strict=True):
        level, walk = top, []
        for token, next_token in zip(tokens, target, strict=True):
            node = level.setdefault(token, _Node(token))
            node.reads[next_token] = None
            walk.append(node)
            level = node.children
        walks.append(walk)
    return top, walks


def _cut_trie(top: dict[int, _Node], walks: list[list[_Node]], depth: int) -> ScorePlan:
    """The trie's segments for ``depth`` rounds; in the round after, each node still to run starts
    one leaf segment per path down its subtree (shared only up to that node). Depth 0 is every
    distinct text on its own."""
    segments: list[Segment] = []
    rounds: list[list[int]] = []
    place: dict[int, tuple[int, int]] = {}  # id(node) -> (segment, position) that computes it
    frontier: list[tuple[_Node, int | None]] = [(node, None) for node in top.values()]
    while frontier:
        this_round: list[int] = []
        next_frontier: list[tuple[_Node, int | None]] = []
        for node, parent in frontier:
            if len(rounds) == depth:
                for path in _paths(node):
                    this_round.append(_add_segment(segments, place, path, parent, branches=False))
                continue
            path = [node]
            while len(path[-1].children) == 1:
                path.extend(path[-1].children.values())
            index = _add_segment(segments, place, path, parent, branches=bool(path[-1].children))
            this_round.append(index)
            next_frontier.extend((child, index) for child in path[-1].children.values())
        rounds.append(this_round)
        frontier = next_frontier
    return ScorePlan(segments, rounds, [[place[id(node)] for node in walk] for walk in walks])


def _paths(node: _Node) -> list[list[_Node]]:
    """Every path from ``node`` down to a node without children."""
    if not node.children:
        return [[node]]
    return [[node, *path] for child in node.children.values() for path in _paths(child)]


def _add_segment(segments: list[Segment], place: dict[int, tuple[int, int]], path: list[_Node], parent: int | None,
                 branches: bool) -> int:
    index = len(segments)
    segment = Segment([node.token for node in path], parent, branches=branches)
    for position, node in enumerate(path):
        # A node on several leaf paths is read where it is first computed (the others compute the
        # same values from the same state).
        if id(node) not in place:
            place[id(node)] = (index, position)
            segment.reads.append(list(node.reads))
        else:
            segment.reads.append([])
    segments.append(segment)
    return index
