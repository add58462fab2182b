"""The fusion pattern API: a fusion is a small readable pattern, registered by name.

A fusion says what subgraph to find (`pattern`), when a match may be rewritten (`condition`)
and what replaces it (`replacement`), written as ordinary Python on onnxscript's rewriter
builders, so that reading one reads like the math:

    from onnxpress.passes import fuse

    @fuse.fusion("swish_to_silu_op", priority=40, opset=(24, None))
    class SwishToSilu:
        '''x * Sigmoid(x) -> Swish(x)'''

        def pattern(op, x):
            return x * op.Sigmoid(x)

        def replacement(op, x):
            return op.Swish(x)

Every fusion has a name, a family (switch a whole family off: `fuse:disable=gelu`), a priority
(lower runs first), the default-domain opset range it is valid for, and the targets it is meant
for (`targets=("ort",)` for onnxruntime contrib ops; None: any target). Matching handles commuted
operands of Add/Mul (`commute=True`, the default), and constants given as initializers or
Constant nodes alike (the pass lifts Constant nodes to initializers before matching, and
`const(value)` reads either). A fusion that is not a subgraph pattern (a variadic Concat, a
fixed point over a chain) can instead be a function `rewrite(model, ctx) -> int` over the
onnx_ir model that returns how many rewrites it made.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from onnxpress.errors import PassError, PassOptionError

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class Fusion:
    """One registered fusion (see the module docstring)."""

    name: str
    patterns: tuple[Callable, ...] = ()
    replacement: Callable | None = None
    condition: Callable | None = None
    rewrite: Callable | None = None
    priority: int = 100
    opset: tuple[int, int | None] = (1, None)
    targets: tuple[str, ...] | None = None
    family: str = ""
    doc: str = ""
    commute: bool = True
    approximation: str | None = None
    default: bool = True
    source: str = "builtin"
    _rules: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def applies_to(self, opset: int, target: str) -> bool:
        lo, hi = self.opset
        if opset < lo or (hi is not None and opset > hi):
            return False
        return self.targets is None or target in self.targets

    def rule_set(self):
        """The onnxscript RewriteRuleSet of this fusion (built once, commuted variants included)."""
        if self._rules is None:
            from onnxscript.rewriter import _pattern_ir
            from onnxscript.rewriter import pattern as orp

            replacement = _bind_by_signature(self.replacement, with_op=True)
            condition = _bind_by_signature(self.condition, with_op=False)
            rules = []
            for i, pat in enumerate(self.patterns):
                graph_pattern = _pattern_ir._to_graph_pattern(pat)
                variants = _commuted(graph_pattern) if self.commute else [graph_pattern]
                for variant in variants:
                    rules.append(_RootFilteredRule(variant, replacement, condition,
                                                   name=f"{self.name}#{i}"))
            self._rules = orp.RewriteRuleSet(rules)
        return self._rules

    def apply(self, model, ctx) -> int:
        """Apply this fusion once over the model (an onnx_ir Model); returns rewrites made."""
        if self.rewrite is not None:
            return int(_call_with(self.rewrite, model, ctx) or 0)
        return int(self.rule_set().apply_to_model(model))


_COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Equal"}


def _commuted(graph_pattern):
    """Variants of a pattern with the operands of commutative ops swapped.

    The pass puts the constant operand of Add/Mul second before matching, so a node whose
    pattern has a constant operand needs no swapped variant: this keeps the number of variants
    at 2^(commutative ops between two computed values) instead of 2^(all Add/Mul).
    """
    import itertools

    from onnxscript.rewriter import _pattern_ir

    def swappable(node) -> bool:
        ident = node.op_identifier()
        if ident is None or ident[0] != "" or ident[1] not in _COMMUTATIVE or len(node.inputs) != 2:
            return False
        return not any(isinstance(v, _pattern_ir.Constant) for v in node.inputs)

    nodes = list(graph_pattern)
    space = [[False, True] if swappable(n) else [False] for n in nodes]
    out = []
    for swaps in itertools.product(*space):
        if not any(swaps):
            out.append(graph_pattern)
            continue
        node_map: dict = {}
        new_inputs = [v.clone(node_map) for v in graph_pattern.inputs]
        new_nodes = [n.clone(node_map, swap) for n, swap in zip(nodes, swaps)]
        new_outputs = [v.clone(node_map) for v in graph_pattern.outputs]
        out.append(_pattern_ir.GraphPattern(new_inputs, new_outputs, new_nodes))
    return out


def _rule_class():
    from onnxscript.rewriter import pattern as orp

    class RootFilteredRule(orp.RewriteRule):
        """A RewriteRule that skips nodes whose op cannot be the pattern's root, before any
        matching work (onnxscript tries every rule on every node)."""

        def __init__(self, graph_pattern, *args, **kwargs):
            super().__init__(graph_pattern, *args, **kwargs)

            self._signature = _signature(graph_pattern.output_node, 3) \
                if graph_pattern.has_single_output_node else None

        def try_rewrite(self, model, graph_or_function, node, **kwargs):
            if self._signature is not None and not _fits(self._signature, node):
                return None
            return super().try_rewrite(model, graph_or_function, node, **kwargs)

    return RootFilteredRule


def _signature(node_pattern, depth: int):
    """(domain, op, [input signatures]) of a pattern node, `depth` levels deep; None where the
    pattern does not pin the op down (a variable, a constant, a generic op)."""
    from onnxscript.rewriter import _pattern_ir

    ident = node_pattern.op_identifier()
    if ident is None:  # cloned (commuted) nodes carry their op as string patterns only
        op, domain = node_pattern.op, node_pattern.domain
        if not isinstance(op, _pattern_ir.StringConstantPattern) or \
                not isinstance(domain, _pattern_ir.StringConstantPattern):
            return None
        ident = (domain.value(), op.value())
    inputs = []
    if depth > 1:
        for v in node_pattern.inputs:
            producer = v.producer() if isinstance(v, _pattern_ir.NodeOutputPattern) else None
            inputs.append(_signature(producer, depth - 1) if producer is not None else None)
    return (ident[0], ident[1], inputs, node_pattern.allow_other_inputs)


def _fits(sig, node) -> bool:
    """A cheap necessary condition for a match rooted at `node` (ops along the first levels)."""
    domain, op, inputs, other_inputs = sig
    node_domain = "" if node.domain == "ai.onnx" else node.domain
    if node.op_type != op or node_domain != domain:
        return False
    for i, sub in enumerate(inputs):
        if sub is None:
            continue
        if i >= len(node.inputs) or node.inputs[i] is None:
            return False
        producer = node.inputs[i].producer()
        if producer is None or not _fits(sub, producer):
            return False
    return True


class _LazyRule:
    cls = None

    def __call__(self, *args, **kwargs):
        if _LazyRule.cls is None:
            _LazyRule.cls = _rule_class()
        return _LazyRule.cls(*args, **kwargs)


_RootFilteredRule = _LazyRule()


def _call_with(fn: Callable, model, ctx):
    params = inspect.signature(fn).parameters
    return fn(model, ctx) if len(params) >= 2 else fn(model)


def _bind_by_signature(fn: Callable | None, *, with_op: bool) -> Callable | None:
    """Call `fn` with only the pattern bindings it names (onnxscript passes all of them)."""
    if fn is None:
        return None
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
    names = [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def call(op_or_ctx, /, **bindings):
        if takes_kwargs:
            return fn(op_or_ctx, **bindings)
        return fn(op_or_ctx, **{k: bindings.get(k) for k in names})

    call.__name__ = getattr(fn, "__name__", "fusion_fn")
    return call


_FUSIONS: dict[str, Fusion] = {}


def fusion(name: str, *, pattern: Callable | Sequence[Callable] | None = None,
           replacement: Callable | None = None, condition: Callable | None = None,
           rewrite: Callable | None = None, priority: int = 100,
           opset: tuple[int, int | None] = (1, None), targets: Iterable[str] | None = None,
           family: str | None = None, commute: bool = True, approximation: str | None = None,
           default: bool = True, doc: str | None = None, replace: bool = False):
    """Register a fusion; returns it, or a decorator when no pattern/rewrite is given.

    Decorate a class holding `pattern` (or a list `patterns`), `replacement` and optionally
    `condition` functions; or a function, which becomes a graph-level `rewrite(model, ctx)`.
    `default=False` registers a fusion that runs only when asked for (`fuse:enable=name`).
    """

    def make(obj: Any = None) -> Fusion:
        pats, repl, cond, rw = pattern, replacement, condition, rewrite
        text = doc
        if inspect.isclass(obj):
            pats = getattr(obj, "patterns", None) or getattr(obj, "pattern", None)
            repl = getattr(obj, "replacement", None)
            cond = getattr(obj, "condition", None)
            text = text or inspect.getdoc(obj) or ""
        elif callable(obj):
            rw = obj
            text = text or inspect.getdoc(obj) or ""
        if callable(pats):
            pats = [pats]
        pats = tuple(pats or ())
        if rw is None and (not pats or repl is None):
            raise PassError(f"fusion '{name}' needs a pattern and a replacement, or a rewrite "
                            "function")
        if name in _FUSIONS and not replace:
            raise PassError(f"a fusion named '{name}' is already registered "
                            f"({_FUSIONS[name].source}); pass replace=True to override it")
        module = getattr(obj, "__module__", None) or getattr(rw or repl, "__module__", "") or ""
        f = Fusion(name=name, patterns=pats, replacement=repl, condition=cond, rewrite=rw,
                   priority=priority, opset=(opset[0], opset[1]),
                   targets=tuple(targets) if targets is not None else None,
                   family=family or name, doc=text or "", commute=commute,
                   approximation=approximation, default=default,
                   source="builtin" if module.startswith("onnxpress.") else module or "user")
        _FUSIONS[name] = f
        return f

    def decorate(obj: Any) -> Any:
        obj.fusion = make(obj)
        return obj

    if pattern is not None or rewrite is not None:
        return make()
    return decorate


def unregister_fusion(name: str) -> None:
    _FUSIONS.pop(name, None)


def get_fusion(name: str) -> Fusion:
    if name not in _FUSIONS:
        raise PassOptionError(f"no fusion named '{name}'; known: {', '.join(sorted(_FUSIONS))}")
    return _FUSIONS[name]


def list_fusions() -> list[Fusion]:
    """Every registered fusion, in the order the pass tries them (priority, then name)."""
    return sorted(_FUSIONS.values(), key=lambda f: (f.priority, f.name))


def select(names: Iterable[str], *, option: str) -> set[str]:
    """Resolve fusion or family names (as given to `disable`/`only`) to fusion names."""
    out: set[str] = set()
    for n in names:
        hit = {f.name for f in _FUSIONS.values() if n in (f.name, f.family)}
        if not hit:
            families = sorted({f.family for f in _FUSIONS.values()})
            raise PassOptionError(
                f"option '{option}' of pass 'fuse': no fusion or family named '{n}'; fusions: "
                f"{', '.join(sorted(_FUSIONS))}; families: {', '.join(families)}")
        out |= hit
    return out


# -- helpers for conditions and replacements --------------------------------------------------
def const(value) -> np.ndarray | None:
    """The numpy value of a constant (initializer or Constant node), else None.

    Initializers that are also graph inputs can be overridden at run time: not constant.
    """
    if value is None:
        return None
    if value.is_graph_input():
        return None
    t = value.const_value
    if t is None:
        node = value.producer()
        if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            return None
        from onnxscript.optimizer import basic_constant_propagation

        basic_constant_propagation([node])
        t = value.const_value
        if t is None:
            return None
    try:
        return t.numpy()
    except Exception:
        return None


def scalar(value) -> float | None:
    """The value of a constant holding one element (any rank), else None."""
    arr = const(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def is_scalar(value, expected: float, rel: float = 1e-4) -> bool:
    v = scalar(value)
    return v is not None and math.isclose(v, expected, rel_tol=rel, abs_tol=1e-7)


def shape(value) -> list[int | str | None] | None:
    """Static shape of a value as a list (ints; names or None for dynamic dims), or None."""
    if value is None or value.shape is None:
        arr = const(value)
        return list(arr.shape) if arr is not None else None
    return [d if isinstance(d, int) else (getattr(d, "value", None)) for d in value.shape]


def rank(value) -> int | None:
    s = shape(value)
    return None if s is None else len(s)


def is_float(value) -> bool:
    from onnxscript import ir

    return value is not None and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16,
                                                 ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


def attr(value, name: str, default: Any = None) -> Any:
    """An attribute of the node producing `value` (ints/floats/ints lists as Python values)."""
    node = value.producer() if value is not None else None
    if node is None:
        return default
    a = node.attributes.get(name)
    return default if a is None else a.value


_counter = [0]


def new_initializer(op, array: np.ndarray, hint: str = "fused"):
    """A new initializer holding `array`, from inside a replacement function."""
    from onnxscript import ir

    _counter[0] += 1
    name = f"onnxpress_fuse/{hint}_{_counter[0]}"
    return op.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)
