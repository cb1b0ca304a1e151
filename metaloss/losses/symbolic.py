"""Symbolic losses: an expression tree over the target ``y`` and the prediction ``f``.

The representation of EvoMAL (Raymond, Chen, Zhang & Xue, "Learning Symbolic Model-Agnostic
Loss Functions via Meta-Learning", IEEE TPAMI 2023, arXiv:2209.08907), after GLO (Gonzalez &
Miikkulainen, "Improved Training Speed, Accuracy, and Data Utilization Through Loss Function
Optimization", IEEE CEC 2020): a loss is a tree of primitives applied elementwise to ``y``
(the one-hot target, or the regression target) and ``f`` (the softmax probability, or the
regression prediction), summed over classes (averaged over output dimensions for
regression). Numeric leaves are the learnable constants φ, which the gradient learner can
refine through the engine (``loss=symbolic meta_optim=adam``); :mod:`metaloss.gp` searches
the trees themselves.

An expression is written in prefix form, the only syntax the parser takes (it never calls
``eval``, and neither does anything else here: a file or a config naming an expression is
data)::

    square(sub(f, y))                    # squared error (Brier score for classification)
    mul(-1.0, mul(y, log(f)))            # cross-entropy

Primitives (EvoMAL's set): ``add sub mul div log sqrt abs tanh min max square sign``;
``div``, ``log`` and ``sqrt`` are protected: ``div(a, b)`` is 1 where ``|b| <= 1e-10``,
``log(x) = log(max(|x|, 1e-10))``, ``sqrt(x) = sqrt(max(|x|, 1e-10))``, so every primitive is
finite with finite gradients for finite inputs (a nested ``square`` can still overflow: the
inner training then diverges, which the search ranks last).

In a saved loss the tree is the ``program`` buffer (one code per node in prefix order, -1
after the last) and the ``constants`` parameter; the constructor's ``expression`` is
written from them (:attr:`SymbolicLoss.init_kwargs`), and loading checks that the two agree.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaloss.losses.base import ParametricLoss, binary_as_two_class, one_hot

EPS = 1e-10  # the protection threshold of div, log and sqrt

Token = str | float  # a primitive's or terminal's name, or a constant's value
Fn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (y, f, constants) -> elementwise loss


def _div(a: Tensor, b: Tensor) -> Tensor:
    ok = b.abs() > EPS
    return torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), torch.ones_like(a))


PRIMITIVES: dict[str, tuple[int, Callable[..., Tensor]]] = {
    "add": (2, torch.add),
    "sub": (2, torch.sub),
    "mul": (2, torch.mul),
    "div": (2, _div),
    "log": (1, lambda x: torch.log(x.abs().clamp_min(EPS))),
    "sqrt": (1, lambda x: torch.sqrt(x.abs().clamp_min(EPS))),
    "abs": (1, torch.abs),
    "tanh": (1, torch.tanh),
    "min": (2, torch.minimum),
    "max": (2, torch.maximum),
    "square": (1, torch.square),
    "sign": (1, torch.sign),
}
TERMINALS = ("y", "f")
# codes in the ``program`` buffer: y, f, a constant, then the primitives in order; -1 = unused
CODES: tuple[str, ...] = (*TERMINALS, "const", *PRIMITIVES)
CONST = CODES.index("const")
PAD = -1
MAX_NODES = 1023  # the largest tree a loss may hold (the loader's size check)
MAX_DEPTH = 64  # the deepest tree (parsing, printing and compiling recurse once per level)
MAX_CONSTANTS = 256

DEFAULT_EXPRESSION = "square(sub(f, y))"
CROSS_ENTROPY = "mul(-1.0, mul(y, log(f)))"


class ExpressionError(ValueError):
    """An expression that is not a well-formed tree of the primitives."""


# ---------------------------------------------------------------- text <-> tokens

_LEXEME = re.compile(r"\s*(?:([A-Za-z_]\w*)|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(.))")


def parse(text: str, *, max_nodes: int = MAX_NODES) -> list[Token]:
    """The prefix token list of an expression such as ``mul(-1.0, mul(y, log(f)))``.
    Raises :class:`ExpressionError` naming what is wrong and where."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"an expression must be a non-empty string, got {text!r}")
    lexemes: list[tuple[str, str]] = []
    for m in _LEXEME.finditer(text):
        name, number, other = m.groups()
        if name is not None:
            lexemes.append(("name", name))
        elif number is not None:
            lexemes.append(("number", number))
        elif other is not None and other.strip():
            if other not in "(),":
                raise ExpressionError(f"unexpected character {other!r} in expression {text!r}")
            lexemes.append((other, other))
    tokens: list[Token] = []
    pos = 0

    def expect(kind: str) -> None:
        nonlocal pos
        if pos >= len(lexemes) or lexemes[pos][0] != kind:
            got = lexemes[pos][1] if pos < len(lexemes) else "the end"
            raise ExpressionError(f"expected {kind!r} but found {got!r} in expression {text!r}")
        pos += 1

    def node(level: int = 0) -> None:
        nonlocal pos
        if level > MAX_DEPTH:
            raise ExpressionError(f"expression {text[:60]!r}... is nested deeper than {MAX_DEPTH}")
        if pos >= len(lexemes):
            raise ExpressionError(f"expression {text!r} ends where an operand was expected")
        kind, value = lexemes[pos]
        pos += 1
        if len(tokens) >= max_nodes:
            raise ExpressionError(f"expression {text!r} has more than {max_nodes} nodes")
        if kind == "number":
            c = float(value)
            if not math.isfinite(c):
                raise ExpressionError(f"constant {value} in expression {text!r} is not finite")
            tokens.append(c)
            return
        if kind != "name":
            raise ExpressionError(f"unexpected {value!r} in expression {text!r}")
        if value in TERMINALS:
            tokens.append(value)
            return
        if value not in PRIMITIVES:
            raise ExpressionError(
                f"unknown name {value!r} in expression {text!r}; valid: terminals "
                f"{', '.join(TERMINALS)}, primitives {', '.join(PRIMITIVES)}, numbers"
            )
        tokens.append(value)
        expect("(")
        for i in range(PRIMITIVES[value][0]):
            if i:
                expect(",")
            node(level + 1)
        expect(")")

    node()
    if pos != len(lexemes):
        raise ExpressionError(
            f"unexpected {lexemes[pos][1]!r} after a complete expression {text!r}"
        )
    return tokens


def to_text(tokens: Sequence[Token]) -> str:
    """The prefix expression ``parse`` reads back to the same tokens (constants by ``repr``)."""
    out, _ = _text(tokens, 0)
    return out


def _text(tokens: Sequence[Token], i: int) -> tuple[str, int]:
    tok = tokens[i]
    if isinstance(tok, float):
        return repr(tok), i + 1
    if tok in TERMINALS:
        return tok, i + 1
    args, j = [], i + 1
    for _ in range(PRIMITIVES[tok][0]):
        a, j = _text(tokens, j)
        args.append(a)
    return f"{tok}({', '.join(args)})", j


def subtree_end(tokens: Sequence[Token], i: int) -> int:
    """The index just after the subtree that starts at ``i``."""
    need = 1
    while need:
        tok = tokens[i]
        need += (PRIMITIVES[tok][0] if isinstance(tok, str) and tok in PRIMITIVES else 0) - 1
        i += 1
    return i


def depth(tokens: Sequence[Token]) -> int:
    """The tree's depth (a single leaf: 0)."""
    best, open_ = 0, list[int]()  # operands still wanted by each open node
    for tok in tokens:
        best = max(best, len(open_))
        arity = PRIMITIVES[tok][0] if isinstance(tok, str) and tok in PRIMITIVES else 0
        if arity:
            open_.append(arity)
            continue
        while open_:
            open_[-1] -= 1
            if open_[-1]:
                break
            open_.pop()
    return best


def n_constants(tokens: Sequence[Token]) -> int:
    return sum(isinstance(t, float) for t in tokens)


# ---------------------------------------------------------------- tokens <-> program tensors


def encode(tokens: Sequence[Token], max_nodes: int, max_constants: int) -> tuple[list, list]:
    """``(program, constants)`` as plain lists of length ``max_nodes`` / ``max_constants``."""
    if len(tokens) > max_nodes:
        raise ExpressionError(f"a tree of {len(tokens)} nodes does not fit max_nodes={max_nodes}")
    if n_constants(tokens) > max_constants:
        raise ExpressionError(
            f"a tree with {n_constants(tokens)} constants does not fit max_constants="
            f"{max_constants}"
        )
    program, constants = [], []
    for tok in tokens:
        if isinstance(tok, float):
            program.append(float(CONST))
            constants.append(tok)
        else:
            program.append(float(CODES.index(tok)))
    return program + [float(PAD)] * (max_nodes - len(program)), constants + [0.0] * (
        max_constants - len(constants)
    )


def structure(program: Tensor) -> tuple[int, ...]:
    """The node codes of a ``program`` buffer, checked to be one well-formed tree."""
    if program.ndim != 1:
        raise ExpressionError(f"a program is one code per node, got shape {tuple(program.shape)}")
    try:
        values = program.tolist()
    except RuntimeError as e:  # e.g. a program batched under vmap
        raise ExpressionError(
            "a symbolic loss's program cannot vary inside a vectorised call (vmap over "
            "programs): evaluate the trees one by one (metaloss.gp batches them itself)"
        ) from e
    codes: list[int] = []
    for v in values:
        if v != int(v) or not (v == PAD or 0 <= v < len(CODES)):
            raise ExpressionError(
                f"program code {v!r} is not a node code (0..{len(CODES) - 1}, or {PAD} after "
                "the last node)"
            )
        codes.append(int(v))
    n = codes.index(PAD) if PAD in codes else len(codes)
    if any(c != PAD for c in codes[n:]):
        raise ExpressionError("program has node codes after the first unused (-1) slot")
    if n == 0:
        raise ExpressionError("program is empty")
    need = 1
    for i, c in enumerate(codes[:n]):
        if need == 0:
            raise ExpressionError(f"program has {n - i} node(s) after a complete tree")
        name = CODES[c]
        need += (PRIMITIVES[name][0] if name in PRIMITIVES else 0) - 1
    if need:
        raise ExpressionError(f"program ends with {need} operand(s) missing")
    if depth([CODES[c] if c != CONST else 0.0 for c in codes[:n]]) > MAX_DEPTH:
        raise ExpressionError(f"program is nested deeper than {MAX_DEPTH}")
    return tuple(codes[:n])


def decode(codes: Sequence[int], constants: Sequence[float]) -> list[Token]:
    out: list[Token] = []
    k = 0
    for c in codes:
        if c == CONST:
            if k >= len(constants):
                raise ExpressionError(f"program uses more than its {len(constants)} constants")
            out.append(float(constants[k]))
            k += 1
        else:
            out.append(CODES[c])
    return out


def compile_codes(codes: Sequence[int]) -> Fn:
    """The elementwise function ``(y, f, constants) -> loss`` of a tree; the k-th constant
    node reads ``constants[k]`` (so φ can be differentiated, and batched under ``vmap``)."""
    fn, end, _ = _build(codes, 0, 0)
    assert end == len(codes)
    return fn


def _build(codes: Sequence[int], i: int, k: int) -> tuple[Fn, int, int]:
    name = CODES[codes[i]]
    if name == "y":
        return (lambda y, f, c: y), i + 1, k
    if name == "f":
        return (lambda y, f, c: f), i + 1, k
    if name == "const":
        idx = k
        return (lambda y, f, c: c[idx].expand_as(f)), i + 1, k + 1
    arity, op = PRIMITIVES[name]
    args, j = [], i + 1
    for _ in range(arity):
        a, j, k = _build(codes, j, k)
        args.append(a)
    if arity == 1:
        (a,) = args
        return (lambda y, f, c: op(a(y, f, c))), j, k
    a, b = args
    return (lambda y, f, c: op(a(y, f, c), b(y, f, c))), j, k


def compile_tokens(tokens: Sequence[Token]) -> tuple[Fn, Tensor]:
    """The function of a token list and its constants as a tensor (float64 for probes)."""
    program, constants = encode(tokens, len(tokens), n_constants(tokens))
    return compile_codes([int(v) for v in program]), torch.tensor(constants, dtype=torch.float64)


# ---------------------------------------------------------------- the loss on a batch


def loss_inputs(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(y, f, is_regression)``: the target and prediction as the tree sees them, ``[B, D]``
    (regression) or one-hot and softmax ``[B, C]`` (classification, binary as two classes)."""
    if target.is_floating_point():
        return target.reshape(target.shape[0], -1), pred.reshape(pred.shape[0], -1), True
    logits = binary_as_two_class(pred)
    p = torch.softmax(logits, dim=-1)
    return one_hot(target, logits.shape[-1], p.dtype), p, False


def reduce(values: Tensor, regression: bool) -> Tensor:
    """Per-example loss ``[B]``: the mean over output dimensions, or the sum over classes."""
    return values.mean(-1) if regression else values.sum(-1)


# ---------------------------------------------------------------- checks and printing


def shape_problem(tokens: Sequence[Token], kind: str) -> str | None:
    """Why a tree cannot be a loss for ``kind`` (None: it can). On a probe grid it must be
    finite with finite gradients, not constant in the prediction, and lower when the
    prediction is at the target than away from it (for classification: at true-class
    probability 0.99 than at 0.01; for regression: at f = y than at f = y ± 2)."""
    fn, c = compile_tokens(tokens)
    if kind in ("classification", "binary"):
        p = torch.linspace(0.01, 0.99, 99, dtype=torch.float64, requires_grad=True)
        q = 1 - p
        ones, zeros = torch.ones_like(p), torch.zeros_like(p)
        values = fn(ones, p, c) + fn(zeros, q, c)  # true class at p, the other at 1 - p
        near, far = values[-1], values[0]
    elif kind == "regression":
        d = torch.linspace(-2, 2, 41, dtype=torch.float64)
        y = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)[:, None].expand(3, 41)
        p = (y + d).detach().requires_grad_(True)
        values = fn(y, p, c)
        near = values[:, 20].max()
        far = torch.minimum(values[:, 0], values[:, -1]).min()
    else:
        return f"symbolic losses fit classification, binary and regression tasks, not {kind}"
    if values.shape != p.shape or not values.requires_grad:  # no f in the tree
        return "does not depend on the prediction f"
    if not bool(torch.isfinite(values).all()):
        return "not finite on the probe grid"
    (grad,) = torch.autograd.grad(values.sum(), p, allow_unused=True)
    if grad is None or not bool(torch.isfinite(grad).all()):
        return "gradient not finite on the probe grid"
    values, near, far = values.detach(), near.detach(), far.detach()
    if float(values.max() - values.min()) <= 1e-8 * (1 + float(values.abs().max())):
        return "constant in the prediction"
    if not float(near) < float(far) - 1e-6 * (1 + abs(float(far))):  # beyond rounding
        return "not lower at the target than away from it"
    return None


def to_sympy(tokens: Sequence[Token]) -> Any:
    """The tree as a sympy expression (protected operators written as their plain form:
    ``log|x|``, ``sqrt|x|``, ``a/b``), for printing."""
    import sympy  # here: ~0.5 s to import, and only printing needs it

    y, f = sympy.symbols("y f", real=True)
    ops = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "log": lambda a: sympy.log(sympy.Abs(a)),
        "sqrt": lambda a: sympy.sqrt(sympy.Abs(a)),
        "abs": sympy.Abs,
        "tanh": sympy.tanh,
        "min": sympy.Min,
        "max": sympy.Max,
        "square": lambda a: a**2,
        "sign": sympy.sign,
    }

    def build(i: int) -> tuple[Any, int]:
        tok = tokens[i]
        if isinstance(tok, float):
            return sympy.Float(tok, 4), i + 1
        if tok in TERMINALS:
            return (y if tok == "y" else f), i + 1
        args, j = [], i + 1
        for _ in range(PRIMITIVES[tok][0]):
            a, j = build(j)
            args.append(a)
        return ops[tok](*args), j

    return build(0)[0]


def pretty(tokens: Sequence[Token]) -> str:
    """The tree as sympy writes it, one line: sympy's automatic canonical form (like terms
    combined, constants folded, ``2.0*f + 3.0*f`` as ``5.0*f``), read as plain algebra (the
    protected operators as their plain forms: ``div(y, mul(f, y))`` prints as ``1/f``, though
    ``div(0, 0)`` is 1 here). Not ``sympy.simplify``: on some trees of 31 nodes it takes
    minutes, and a search prints every generation's best."""
    return _pretty(to_text(tokens))


@functools.lru_cache(maxsize=4096)
def _pretty(text: str) -> str:
    try:
        return str(to_sympy(parse(text)))
    except Exception:  # sympy refuses some Min/Max/sign combinations: print the prefix form
        return text


# ---------------------------------------------------------------- the loss module


def _check_loaded_program(module: nn.Module, _keys: Any) -> None:
    program = module.get_buffer("program")
    structure(program)  # raises ExpressionError on a program that is not one tree


class SymbolicLoss(ParametricLoss):
    """A loss given by an expression tree (EvoMAL's representation; see the module docstring):
    ``loss(pred, target) = Σ_classes tree(y, f)`` (mean over dimensions for regression).

    ``expression``: the tree in prefix form (``square(sub(f, y))``; cross-entropy is
    ``mul(-1.0, mul(y, log(f)))``); its numbers are the learnable constants φ.
    ``max_nodes`` / ``max_constants``: the capacity of the ``program`` buffer and of φ, so a
    search (:mod:`metaloss.gp`) can write any tree up to that size into the same module.
    """

    kinds = ("classification", "binary", "regression")
    constants: nn.Parameter
    program: Tensor

    def __init__(
        self, expression: str = DEFAULT_EXPRESSION, max_nodes: int = 31, max_constants: int = 8
    ) -> None:
        if not 1 <= int(max_nodes) <= MAX_NODES:
            raise ValueError(f"max_nodes must be in 1..{MAX_NODES}, got {max_nodes}")
        if not 0 <= int(max_constants) <= MAX_CONSTANTS:
            raise ValueError(f"max_constants must be in 0..{MAX_CONSTANTS}, got {max_constants}")
        self._capacity = (int(max_nodes), int(max_constants))
        super().__init__(expression=expression, max_nodes=max_nodes, max_constants=max_constants)
        tokens = parse(expression, max_nodes=int(max_nodes))
        program, constants = encode(tokens, int(max_nodes), int(max_constants))
        self.register_buffer("program", torch.tensor(program))
        self.constants = nn.Parameter(torch.tensor(constants))
        self._expression = to_text(tokens)
        self._compiled: dict[tuple[int, ...], Fn] = {}
        self._last: tuple[tuple, Fn] | None = None  # (program's storage and version, its tree)
        # a loaded state (a checkpoint, a file) must hold one well-formed tree: refused here,
        # naming the problem, rather than when the loss is next called or saved
        self.register_load_state_dict_post_hook(_check_loaded_program)

    # the constructor arguments that rebuild this loss: the expression of the *current* tree
    @property
    def init_kwargs(self) -> dict[str, Any]:
        n, k = self._capacity
        expr = self._expression if self.program.is_meta else to_text(self.tokens())
        return {"expression": expr, "max_nodes": n, "max_constants": k}

    @init_kwargs.setter
    def init_kwargs(self, value: dict[str, Any]) -> None:
        pass  # derived from the tree (see the property)

    @property
    def capacity(self) -> tuple[int, int]:
        """``(max_nodes, max_constants)``: the largest tree this module holds."""
        return self._capacity

    def tokens(self) -> list[Token]:
        """The current tree, constants by value (float32 ones as their shortest decimal that
        is the same float32: 0.7, not 0.699999988079071)."""
        values = self.constants.detach().cpu()
        if values.dtype == torch.float32:
            consts = [float(str(v)) for v in values.numpy()]
        else:
            consts = values.double().tolist()
        return decode(structure(self.program), consts)

    def set_tokens(self, tokens: Sequence[Token]) -> None:
        """Write a tree into this module (in place: the tensors φ names stay the same)."""
        program, constants = encode(tokens, *self._capacity)
        with torch.no_grad():
            self.program.copy_(torch.tensor(program))
            self.constants.copy_(torch.tensor(constants))

    def expression(self) -> str:
        return to_text(self.tokens())

    def forward(self, pred: Tensor, target: Tensor, **_: Any) -> Tensor:
        fn = self._function(self.program)
        y, f, regression = loss_inputs(pred, target)
        return reduce(fn(y, f, self.constants.to(f.dtype)), regression)

    def _function(self, program: Tensor) -> Fn:
        """The compiled tree of ``program`` (this module's buffer, or the one functional_call
        passes). Called every inner step: the program read and checked last is remembered by
        its storage and version (an in-place write bumps the version), so an unchanged program
        is not read from the tensor and checked again."""
        try:
            key: tuple | None = (program.data_ptr(), program._version)
        except RuntimeError:  # no storage (e.g. under vmap): read it every time
            key = None
        if key is not None and self._last is not None and self._last[0] == key:
            return self._last[1]
        codes = structure(program)
        fn = self._compiled.get(codes)
        if fn is None:
            fn = self._compiled.setdefault(codes, compile_codes(codes))
        if key is not None:
            self._last = (key, fn)
        return fn

    @classmethod
    def from_saved(cls, init_kwargs: dict, state_dict: dict) -> SymbolicLoss:
        loss = cls(**init_kwargs)
        want = structure(loss.program)
        loss.load_state_dict(state_dict)
        got = structure(loss.program)  # a hand-edited program is refused here
        if got != want:
            raise ExpressionError(
                f"the saved program ({to_text(loss.tokens())}) is not the saved expression "
                f"({init_kwargs.get('expression')}); the file was edited or is corrupt"
            )
        return loss

    def extra_repr(self) -> str:
        return "" if self.program.is_meta else f"expression={self.expression()}"
