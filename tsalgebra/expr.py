"""Symbolic tensor-network expressions.

A :class:`Tensor` is a named array with named legs; its data is optional, so a
tensor can be a pure symbol with a shape.  A :class:`Network` is a set of
tensors whose shared legs are summed over, plus the open legs that remain.
Open legs are of two kinds: *input* legs, each fed its own copy of the padded
input x~ = [1; x], and *output* legs.  A leg may be shared by more than two
tensors (a hyperedge, as in the CP form of a bilinear layer); einsum sums it
once.  A :class:`Sum` is a weighted sum of networks with matching outputs.

Nothing here computes: contraction orders come from :mod:`tsalgebra.planner`
and execution from :mod:`tsalgebra.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import opt_einsum as oe

__all__ = ["Tensor", "Network", "Sum"]


def _shape_of(data: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in data.shape)


@dataclass(frozen=True, eq=False)
class Tensor:
    """A tensor with one name per leg.

    ``data`` may be ``None`` (a symbol with a shape), a numpy array (float or
    object dtype, for exact arithmetic) or a torch tensor.
    """

    name: str
    legs: tuple[str, ...]
    shape: tuple[int, ...]
    data: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "legs", tuple(self.legs))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.legs) != len(self.shape):
            raise ValueError(
                f"tensor {self.name!r}: {len(self.legs)} legs {self.legs} but shape {self.shape}"
            )
        if len(set(self.legs)) != len(self.legs):
            raise ValueError(f"tensor {self.name!r}: repeated leg in {self.legs}")
        if self.data is not None and _shape_of(self.data) != self.shape:
            raise ValueError(
                f"tensor {self.name!r}: data of shape {_shape_of(self.data)} for declared shape {self.shape}"
            )

    @classmethod
    def of(cls, name: str, legs: Sequence[str], data: Any) -> "Tensor":
        """A tensor holding ``data``, its shape read from the data."""
        return cls(name, tuple(legs), _shape_of(data), data)

    @property
    def symbolic(self) -> bool:
        return self.data is None

    def relabel(self, legs: Mapping[str, str], prefix: str = "") -> "Tensor":
        """Rename legs through ``legs`` (missing names kept) and prefix the name."""
        return Tensor(prefix + self.name, tuple(legs.get(l, l) for l in self.legs), self.shape, self.data)

    def __str__(self) -> str:
        return f"{self.name}[{','.join(self.legs)}]"


@dataclass(frozen=True, eq=False)
class Network:
    """Tensors contracted over their shared legs.

    ``inputs`` are open legs each fed a copy of x~ (so ``len(inputs)`` is the
    polynomial degree); ``outputs`` are the remaining open legs, in order.
    ``symmetries`` are generators, as permutations of ``inputs`` (``p[k]`` is
    the input that input ``k`` moves to), under which the contracted tensor is
    exactly invariant.  Declaring one that does not hold gives wrong orbit
    weights, so builders only declare symmetries that hold for the weights.
    """

    tensors: tuple[Tensor, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    symmetries: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "symmetries", tuple(tuple(p) for p in self.symmetries))
        sizes: dict[str, int] = {}
        for t in self.tensors:
            for leg, size in zip(t.legs, t.shape):
                if sizes.setdefault(leg, size) != size:
                    raise ValueError(
                        f"leg {leg!r} has size {sizes[leg]} in one tensor and {size} in {t.name!r}"
                    )
        opened = self.inputs + self.outputs
        if len(set(opened)) != len(opened):
            raise ValueError(f"an open leg is listed twice in inputs {self.inputs} / outputs {self.outputs}")
        for leg in opened:
            if leg not in sizes:
                raise ValueError(f"open leg {leg!r} belongs to no tensor")
        k = len(self.inputs)
        for p in self.symmetries:
            if sorted(p) != list(range(k)):
                raise ValueError(f"symmetry {p} is not a permutation of the {k} inputs")
        object.__setattr__(self, "_sizes", sizes)

    # ----------------------------------------------------------------- queries
    @property
    def sizes(self) -> dict[str, int]:
        """Size of every leg."""
        return dict(self._sizes)  # type: ignore[attr-defined]

    @property
    def open_legs(self) -> tuple[str, ...]:
        return self.outputs + self.inputs

    @property
    def inner_legs(self) -> tuple[str, ...]:
        opened = set(self.open_legs)
        return tuple(l for l in self._sizes if l not in opened)  # type: ignore[attr-defined]

    @property
    def degree(self) -> int:
        """Number of copies of x~ the network takes."""
        return len(self.inputs)

    @property
    def symbolic(self) -> bool:
        """True when some tensor has no data."""
        return any(t.symbolic for t in self.tensors)

    # -------------------------------------------------------------- rewriting
    def relabel(self, legs: Mapping[str, str], prefix: str = "") -> "Network":
        """Rename legs (``legs`` maps old to new names) and prefix tensor names."""
        new = [legs.get(l, l) for l in self._sizes]  # type: ignore[attr-defined]
        if len(set(new)) != len(new):
            raise ValueError(f"relabelling {dict(legs)} merges two legs")
        return Network(
            tuple(t.relabel(legs, prefix) for t in self.tensors),
            tuple(legs.get(l, l) for l in self.inputs),
            tuple(legs.get(l, l) for l in self.outputs),
            self.symmetries,
        )

    def fresh(self, prefix: str) -> "Network":
        """A copy with every leg and tensor name prefixed, for use beside other copies."""
        return self.relabel({l: prefix + l for l in self._sizes}, prefix)  # type: ignore[attr-defined]

    def join(self, other: "Network", pairs: Mapping[str, str]) -> "Network":
        """Connect open legs of ``self`` to open legs of ``other``.

        ``pairs`` maps a leg of ``self`` to a leg of ``other``; the joined legs
        are summed and leave the open lists.  All other leg names of the two
        networks must be distinct (use :meth:`fresh` first).  Declared
        symmetries are dropped, since joining breaks them in general.
        """
        mine = set(self._sizes)  # type: ignore[attr-defined]
        for a, b in pairs.items():
            if a not in self.open_legs:
                raise ValueError(f"cannot join {a!r}: not an open leg of the first network")
            if b not in other.open_legs:
                raise ValueError(f"cannot join {b!r}: not an open leg of the second network")
            if self._sizes[a] != other._sizes[b]:  # type: ignore[attr-defined]
                raise ValueError(f"cannot join {a!r} (size {self._sizes[a]}) to {b!r} (size {other._sizes[b]})")  # type: ignore[attr-defined]
        other = other.relabel({b: a for a, b in pairs.items()})
        clash = (mine & set(other._sizes)) - set(pairs)  # type: ignore[attr-defined]
        if clash:
            raise ValueError(f"leg names {sorted(clash)} occur in both networks; relabel one first (Network.fresh)")
        joined = set(pairs)
        keep = lambda legs: tuple(l for l in legs if l not in joined)  # noqa: E731
        return Network(
            self.tensors + other.tensors,
            keep(self.inputs) + keep(other.inputs),
            keep(self.outputs) + keep(other.outputs),
        )

    def substitute(self, inner: "Network") -> "Network":
        """Feed every input leg of ``self`` its own fresh copy of ``inner``.

        ``inner`` must have one output leg, of the size of ``self``'s input
        legs.  This is composition: the result's inputs are the inner copies'
        inputs in order, so degrees multiply.  Symmetries of both are kept:
        an outer symmetry permutes whole copies, an inner one acts in each copy.
        """
        if len(inner.outputs) != 1:
            raise ValueError(f"can only substitute a network with one output leg, not {inner.outputs}")
        tensors: list[Tensor] = []
        inputs: list[str] = []
        for k, leg in enumerate(self.inputs):
            copy = inner.fresh(f"{k}.")
            copy = copy.relabel({copy.outputs[0]: leg})
            if copy.sizes[leg] != self._sizes[leg]:  # type: ignore[attr-defined]
                raise ValueError(
                    f"cannot feed input leg {leg!r} of size {self._sizes[leg]} "  # type: ignore[attr-defined]
                    f"with an output of size {copy.sizes[leg]}"
                )
            tensors.extend(copy.tensors)
            inputs.extend(copy.inputs)
        n = inner.degree
        syms = []
        for p in self.symmetries:  # move copy k to copy p[k]
            syms.append(tuple(p[i // n] * n + i % n for i in range(len(inputs))))
        for k in range(self.degree):
            for q in inner.symmetries:
                syms.append(
                    tuple(k * n + q[i % n] if i // n == k else i for i in range(len(inputs)))
                )
        return Network(self.tensors + tuple(tensors), tuple(inputs), self.outputs, tuple(syms))

    def shapes_only(self) -> "Network":
        """The same network with every tensor's data dropped (shapes and
        declared symmetries kept): what planning needs, nothing it allocates."""
        tensors = tuple(t if t.data is None else Tensor(t.name, t.legs, t.shape) for t in self.tensors)
        return Network(tensors, self.inputs, self.outputs, self.symmetries)

    def permute_inputs(self, perm: Sequence[int]) -> "Network":
        """The network with input ``k`` moved to position ``perm[k]``."""
        new = [""] * len(self.inputs)
        for k, p in enumerate(perm):
            new[p] = self.inputs[k]
        return Network(self.tensors, tuple(new), self.outputs)

    # ---------------------------------------------------------------- einsum
    def einsum(self, output: Sequence[str] | None = None) -> tuple[str, list[Tensor]]:
        """The einsum equation of the contraction and its operands.

        Symbols are assigned in order of first appearance, so two networks
        with the same topology give the same equation.  ``output`` defaults
        to :attr:`open_legs` (outputs, then inputs).
        """
        output = self.open_legs if output is None else tuple(output)
        symbols: dict[str, str] = {}

        def sym(leg: str) -> str:
            if leg not in symbols:
                symbols[leg] = oe.get_symbol(len(symbols))
            return symbols[leg]

        terms = ["".join(sym(l) for l in t.legs) for t in self.tensors]
        for leg in output:
            if leg not in self._sizes:  # type: ignore[attr-defined]
                raise ValueError(f"output leg {leg!r} is not a leg of the network")
        return ",".join(terms) + "->" + "".join(sym(l) for l in output), list(self.tensors)

    def topology(self) -> str:
        """A key equal for networks that differ only in names, sizes and data."""
        return self.einsum()[0] + f"|{len(self.outputs)}"

    def same_topology(self, other: "Network") -> bool:
        return self.topology() == other.topology()

    def __str__(self) -> str:
        body = " ".join(str(t) for t in self.tensors)
        return f"{body} -> out[{','.join(self.outputs)}] x~[{','.join(self.inputs)}]"

    def __repr__(self) -> str:
        return f"Network({self}, degree={self.degree})"


@dataclass(frozen=True, eq=False)
class Sum:
    """A weighted sum of networks whose output legs have the same sizes.

    Terms may differ in degree; inner products treat a sum bilinearly.
    """

    terms: tuple[tuple[Any, Network], ...]

    def __post_init__(self) -> None:
        terms = tuple((c, n) for c, n in self.terms)
        if not terms:
            raise ValueError("a Sum needs at least one term")
        ref = [terms[0][1].sizes[l] for l in terms[0][1].outputs]
        for _, n in terms[1:]:
            got = [n.sizes[l] for l in n.outputs]
            if got != ref:
                raise ValueError(f"terms of a Sum have output sizes {ref} and {got}")
        object.__setattr__(self, "terms", terms)

    @classmethod
    def of(cls, items: Iterable[Network | tuple[Any, Network] | "Sum"]) -> "Sum":
        terms: list[tuple[Any, Network]] = []
        for item in items:
            if isinstance(item, Sum):
                terms.extend(item.terms)
            elif isinstance(item, Network):
                terms.append((1, item))
            else:
                terms.append(tuple(item))  # type: ignore[arg-type]
        return cls(tuple(terms))

    def __add__(self, other: "Sum | Network") -> "Sum":
        return Sum.of([self, other])

    def __mul__(self, c: Any) -> "Sum":
        return Sum(tuple((c * w, n) for w, n in self.terms))

    __rmul__ = __mul__

    def __str__(self) -> str:
        return "\n+ ".join(f"({c}) * {n}" for c, n in self.terms)
