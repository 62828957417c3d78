"""The plan tree: one schema for the search, the Redis store, snapshots and exports."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field

from cpl.config import SearchConfig
from cpl.formats import StepKind
from cpl.protocols import State


class Node(BaseModel):
    """A state; the edge into it is the step ``text`` (empty at the root).

    ``V`` is the state value: the value model's guess (or the terminal reward) until the search visits the
    node's children, then the visit-weighted mean of their Q (eq. 3). ``Q`` is Q(parent, step) = r + V
    (eq. 2, with r folded into the terminal value).
    """

    id: int
    parent: int | None
    depth: int
    kind: StepKind | None = Field(default=None, description="None at the root")
    text: str = ""
    prior: float = 1.0
    logprob: float | None = None
    num_tokens: int = 0
    N: int = 0
    V: float = 0.0
    Q: float = 0.0
    reward: float | None = Field(default=None, description="+1/-1 for graded terminal nodes")
    answer: str | None = None
    correct: bool | None = None
    model_version: str | None = None
    children: list[int] = Field(default_factory=list)
    expanded: bool = False
    dead_end: bool = Field(default=False, description="every sampled candidate hit the token limit")

    @property
    def terminal(self) -> bool:
        return self.kind is StepKind.SOLUTION or self.dead_end


class Tree(BaseModel):
    id: str
    question: str
    gold: str | None = Field(default=None, description="ground-truth answer; None in inference mode")
    config: SearchConfig = Field(default_factory=SearchConfig)
    nodes: list[Node] = Field(default_factory=list)
    simulations_done: int = 0
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def new(cls, tree_id: str, question: str, gold: str | None, config: SearchConfig) -> Tree:
        return cls(id=tree_id, question=question, gold=gold, config=config, nodes=[Node(id=0, parent=None, depth=0)])

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def children(self, node: Node) -> list[Node]:
        return [self.nodes[i] for i in node.children]

    def path(self, node: Node) -> list[Node]:
        """The nodes from the root down to ``node``, both included."""
        path = [node]
        while path[-1].parent is not None:
            path.append(self.nodes[path[-1].parent])
        return path[::-1]

    def state(self, node: Node) -> State:
        steps = [(n.kind, n.text) for n in self.path(node)[1:] if n.kind is not None]
        return State(question=self.question, steps=steps, format=self.config.format)

    def add_child(self, parent: Node, **fields: object) -> Node:
        child = Node.model_validate({"id": len(self.nodes), "parent": parent.id, "depth": parent.depth + 1, **fields})
        self.nodes.append(child)
        parent.children.append(child.id)
        return child

    @property
    def finished(self) -> bool:
        return self.simulations_done >= self.config.simulations
