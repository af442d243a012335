"""Reads a transformers model's ``forward`` to find what the fused path must reproduce.

The fused path runs the model's own forward with one change: the LM head returns zero rows
instead of the logits (see ``transformers.py``). The loss it then computes from the head's input
is the model's own only if everything the forward does between the head and
``self.loss_function`` is something :func:`triton_xent.linear_cross_entropy` does too. This
module checks that from the forward's syntax tree, once per class:

* the head: ``<name> = self.<head>(...)``, one call whose result reaches the loss;
* between the head and ``self.loss_function(<name>, ...)`` only these element-wise steps, in
  any spelling found in transformers 5.24 (``x = x * c``, ``x *= c``, one expression, a local
  alias of ``c``, ``torch.tanh``/``nn.functional.tanh``/``x.tanh()``):

  - ``x * c`` or ``x / c`` (a logit scale: Cohere, Granite, MuseGlimmer), before any soft-cap;
  - ``x / c``, ``tanh``, ``x * c`` with the same ``c`` (Gemma 2's final soft-capping),
    unconditional or under ``if c is not None``;
  - ``x.float()`` / ``x.to(torch.float32)`` (the fused loss is fp32 anyway);

* the head's result used nowhere else but in the output (``logits=...``, a return tuple).

``c`` is an attribute path from ``self`` (``self.config.final_logit_softcapping``,
``self.logit_scale``, ``self.config.get_text_config().logits_scaling``) or a number; it is
read from the model at each call. Anything else (another op on the logits, a loss computed by
the forward itself, the head called twice) makes the class unfusable, with the reason.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass

# A path from ``self``: ("config", "final_logit_softcapping"), or ("config", ("get_text_config",
# (), ()), "x") for a call with constant arguments, or (float,) for a number.
Path = tuple


@dataclass(frozen=True)
class HeadLayout:
    """What sits between a fusable forward's LM head and its loss.

    ``head``: attribute name of the head module. ``scale``: ``(path, invert)`` (the logits are
    multiplied by the value, or divided when ``invert``), applied before ``softcap``; ``None``
    when absent. ``softcap``: path of Gemma 2's soft-cap value, or ``None``. ``scale_optional``
    / ``softcap_optional``: the forward skips the step when the value is ``None``.
    """

    head: str
    scale: tuple[Path, bool] | None = None
    scale_optional: bool = False
    softcap: Path | None = None
    softcap_optional: bool = False


@dataclass(frozen=True)
class ForwardInfo:
    """``calls_loss_function``: the forward computes its loss with ``self.loss_function``.
    ``layout``: set when the fused path reproduces it, else ``reason`` says why not."""

    calls_loss_function: bool
    layout: HeadLayout | None
    reason: str | None


class _Unfusable(Exception):
    pass


def defining_forward(cls):
    """(class, function) of the ``forward`` that ``cls`` runs, below any triton_xent wrapper."""
    for klass in cls.__mro__:
        fn = vars(klass).get("forward")
        if fn is None:
            continue
        while getattr(fn, "_triton_xent_original", None) is not None:
            fn = fn._triton_xent_original
        return klass, fn
    raise TypeError(f"{cls.__name__} has no forward")


@functools.cache
def analyze(fn) -> ForwardInfo:
    """Read ``fn`` (a ``*ForCausalLM``-style forward) as described in the module docstring."""
    try:
        src = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError) as exc:
        return ForwardInfo(False, None, f"its source cannot be read ({exc})")
    fdef = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                None)
    if fdef is None:
        return ForwardInfo(False, None, "its source is not a function definition")
    loss_calls = [n for n in ast.walk(fdef) if isinstance(n, ast.Call) and _is_self_attr(
        n.func, "loss_function")]
    if not loss_calls:
        return ForwardInfo(False, None, "it computes its loss without self.loss_function")
    try:
        if len(loss_calls) > 1:
            raise _Unfusable("it calls self.loss_function more than once")
        layout = _Reader(fdef).layout(loss_calls[0])
    except _Unfusable as exc:
        return ForwardInfo(True, None, str(exc))
    return ForwardInfo(True, layout, None)


def _is_self_attr(node, name=None):
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self" and (name is None or node.attr == name))


class _Reader:
    def __init__(self, fdef):
        self.fdef = fdef
        self.parents = {}
        for parent in ast.walk(fdef):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        # Every binding of a plain name, in source order.
        self.assigns = sorted(
            (n for n in ast.walk(fdef) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))),
            key=lambda n: (n.lineno, n.col_offset),
        )
        self.aliases = self._aliases()

    # -- paths -------------------------------------------------------------------------------
    def _aliases(self):
        """Local names bound exactly once, to a path: ``cap = self.config.logits_soft_cap``."""
        count, value = {}, {}
        for node in ast.walk(self.fdef):  # walrus: ``if (cap := self.config.cap) is not None``
            if isinstance(node, ast.NamedExpr):
                count[node.target.id] = count.get(node.target.id, 0) + 1
                value[node.target.id] = node.value
        for node in self.assigns:
            for name in _target_names(node):
                count[name] = count.get(name, 0) + 1
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    value[name] = node.value
        aliases = {}
        for name, expr in value.items():
            if count[name] == 1:
                try:
                    aliases[name] = self._path(expr, aliases)
                except _Unfusable:
                    pass
        return aliases

    def _path(self, node, aliases=None):
        aliases = self.aliases if aliases is None else aliases
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(
                node.value, bool):
            return (float(node.value),)
        if isinstance(node, ast.Name) and node.id in aliases:
            return aliases[node.id]
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return (node.attr,)
            return self._path(node.value, aliases) + (node.attr,)
        if isinstance(node, ast.NamedExpr):
            return self._path(node.value, aliases)
        if (isinstance(node, ast.Call) and _dotted(node.func) == "getattr" and len(node.args) == 3
                and not node.keywords and _constant(node.args[2]) is None
                and isinstance(_constant(node.args[1]), str)):
            return self._path(node.args[0], aliases) + (("getattr", (node.args[1].value, None), ()),)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            args = tuple(_constant(a) for a in node.args)
            kwargs = tuple((k.arg, _constant(k.value)) for k in node.keywords)
            base = node.func.value
            head = () if isinstance(base, ast.Name) and base.id == "self" else self._path(base, aliases)
            return head + ((node.func.attr, args, kwargs),)
        raise _Unfusable(f"line {getattr(node, 'lineno', '?')}: {ast.unparse(node)} is not an "
                         "attribute of the model or a number")

    # -- the head and the steps after it -----------------------------------------------------
    def layout(self, loss_call) -> HeadLayout:
        arg = next((k.value for k in loss_call.keywords if k.arg == "logits"),
                   loss_call.args[0] if loss_call.args else None)
        if not isinstance(arg, ast.Name):
            raise _Unfusable("the logits it passes to self.loss_function are not a plain variable")
        name, steps, producers, head = arg.id, [], [], None
        # Walk the bindings backwards from the loss call to the head.
        for node in reversed([a for a in self.assigns if a.lineno < loss_call.lineno]):
            if name not in _target_names(node):
                continue
            if isinstance(node, ast.AugAssign):
                value = ast.BinOp(ast.Name(name, ast.Load()), node.op, node.value)
                ast.copy_location(value, node)
            elif len(node.targets if isinstance(node, ast.Assign) else [node.target]) != 1:
                raise _Unfusable(f"line {node.lineno}: the logits are bound with other names")
            else:
                value = node.value
            source, ops = self._ops(value)
            steps[:0] = [(op, self._conditions(node)) for op in ops]
            producers.append(node)
            if isinstance(source, ast.Call):
                head = (source.func.attr, node)
                break
            name = source
        if head is None:
            raise _Unfusable("no call self.<head>(hidden_states) produces the logits of its loss")
        self._check_uses(head[0], head[1], loss_call, producers)
        return self._collapse(head[0], steps)

    def _ops(self, expr):
        """(source, steps) of an element-wise expression of one variable: the source is that
        variable's name, or the ``self.<head>(...)`` call the expression starts from."""
        if isinstance(expr, ast.Name):
            return expr.id, []
        if isinstance(expr, ast.Call) and _is_self_attr(expr.func) and expr.func.attr != "loss_function":
            return expr, []
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div)):
            kind = "mul" if isinstance(expr.op, ast.Mult) else "div"
            pairs = [(expr.left, expr.right)] + ([(expr.right, expr.left)] if kind == "mul" else [])
            for var, const in pairs:
                try:
                    path = self._path(const)
                except _Unfusable:
                    continue
                source, ops = self._ops(var)
                return source, ops + [(kind, path)]
        if isinstance(expr, ast.Call):
            func = expr.func
            if _dotted(func) in ("torch.tanh", "nn.functional.tanh", "torch.nn.functional.tanh",
                                 "F.tanh") and len(expr.args) == 1 and not expr.keywords:
                source, ops = self._ops(expr.args[0])
                return source, ops + [("tanh",)]
            if isinstance(func, ast.Attribute) and not expr.keywords:
                if func.attr == "tanh" and not expr.args:
                    source, ops = self._ops(func.value)
                    return source, ops + [("tanh",)]
                # Copies and fp32 upcasts: the fused loss is computed in fp32 anyway.
                if (func.attr in ("float", "contiguous") and not expr.args) or (
                        func.attr == "to" and len(expr.args) == 1
                        and _dotted(expr.args[0]) == "torch.float32"):
                    source, ops = self._ops(func.value)
                    return source, ops + [("float",)]
        raise _Unfusable(f"line {expr.lineno}: the logits go through {ast.unparse(expr)!r}, which "
                         "the fused loss does not reproduce")

    def _conditions(self, node):
        """The tests of the ``if`` blocks around ``node`` (body branch only), innermost first."""
        tests, child, parent = [], node, self.parents.get(node)
        while parent is not None and parent is not self.fdef:
            if isinstance(parent, ast.If):
                if child in parent.orelse:
                    raise _Unfusable(f"line {node.lineno}: the logits change in an else branch")
                if child is not parent.test:
                    tests.append(parent.test)
            elif isinstance(parent, (ast.For, ast.While, ast.With, ast.Try)):
                raise _Unfusable(f"line {node.lineno}: the logits change inside a "
                                 f"{type(parent).__name__.lower()} block")
            child, parent = parent, self.parents.get(parent)
        return tuple(tests)

    def _check_uses(self, head, head_node, loss_call, producers):
        """The head's result (under any of its names) feeds nothing but the loss and the output."""
        names = {n for p in producers for n in _target_names(p)}
        allowed = set()
        for p in producers:
            allowed |= {id(n) for n in ast.walk(p.value)}
        allowed |= {id(n) for n in ast.walk(loss_call)}
        for node in ast.walk(self.fdef):
            if not (isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load)):
                continue
            if node.lineno < head_node.lineno or id(node) in allowed or self._feeds_output(node):
                continue
            raise _Unfusable(f"line {node.lineno}: the logits are also used in "
                             f"{ast.unparse(self.parents[node])!r}")
        if sum(isinstance(n, ast.Call) and _is_self_attr(n.func, head) for n in ast.walk(self.fdef)) != 1:
            raise _Unfusable(f"it calls self.{head} more than once")

    def _feeds_output(self, node):
        """``logits=logits`` in a call (the output class), or an element of a returned tuple."""
        parent = self.parents.get(node)
        if isinstance(parent, ast.keyword) and parent.arg == "logits":
            return True
        while isinstance(parent, (ast.Tuple, ast.BinOp)):
            parent = self.parents.get(parent)
        return isinstance(parent, (ast.Return, ast.Assign)) and isinstance(
            self.parents.get(node), (ast.Tuple, ast.BinOp))

    def _collapse(self, head, steps) -> HeadLayout:
        """Turn the steps into (scale, softcap), or say why they are not of that form."""
        ops = [(op, cond) for op, cond in steps if op[0] != "float"]
        softcap = softcap_optional = None
        for i in range(len(ops) - 2):
            (a, ca), (b, cb), (c, cc) = ops[i:i + 3]
            if a[0] == "div" and b[0] == "tanh" and c[0] == "mul" and a[1] == c[1] and ca == cb == cc:
                softcap, softcap_optional = a[1], self._optional(ca, a[1])
                if i + 3 != len(ops):
                    raise _Unfusable("the logits change after the soft-cap")
                ops = ops[:i]
                break
        scale = scale_optional = None
        if len(ops) == 1 and ops[0][0][0] in ("mul", "div"):
            (kind, path), cond = ops[0]
            scale, scale_optional = (path, kind == "div"), self._optional(cond, path)
            ops = []
        if ops:
            raise _Unfusable("the logits go through " + ", ".join(op[0] for op, _ in ops)
                             + " steps that are neither one scale nor a soft-cap")
        return HeadLayout(head, scale, bool(scale_optional), softcap, bool(softcap_optional))


    def _optional(self, conditions, path):
        """True for ``if <path> is not None`` around the step, False for none; else unfusable."""
        if not conditions:
            return False
        if len(conditions) == 1:
            test = conditions[0]
            if (isinstance(test, ast.Compare) and len(test.ops) == 1
                    and isinstance(test.ops[0], ast.IsNot) and isinstance(test.comparators[0], ast.Constant)
                    and test.comparators[0].value is None):
                try:
                    if self._path(test.left) == path:
                        return True
                except _Unfusable:
                    pass
        raise _Unfusable("a step on the logits depends on a condition other than its value being set")


def _target_names(node):
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _constant(node):
    if isinstance(node, ast.Constant):
        return node.value
    raise _Unfusable(f"line {node.lineno}: {ast.unparse(node)} is not a constant")

