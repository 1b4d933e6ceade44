"""Built-in reward functions: arithmetic, math answers, a format regex, and code run in the sandbox.

Each is a plain ``fn(prompt, response, **metadata) -> float`` (see ``asyncrl.rewards.interface``).
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ONLY_NUMBER = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*\.?\s*$")


def arithmetic_reward(prompt: str, response: str, *, answer: str, **_: object) -> float:
    """1.0 when the last number in the response equals the answer, plus 0.2 when the response is only a number."""
    numbers = _NUMBER.findall(response)
    correct = bool(numbers) and float(numbers[-1]) == float(answer)
    concise = bool(_ONLY_NUMBER.match(response))
    return float(correct) + 0.2 * float(concise)


# --- math answers -------------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number as written in prose: a LaTeX fraction, a plain fraction, or a decimal with optional thousands separators.
# A minus sign counts only when it cannot be a subtraction (`5-3` ends in 3, `x = -3` in -3).
_SIGN = r"(?:(?<![\w.)}])-)?"
_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_LATEX_FRAC = r"\\[dt]?frac\s*(?:\{\s*-?\d+\s*\}|\d)\s*(?:\{\s*\d+\s*\}|\d)"
_PROSE_NUMBER = re.compile(rf"{_SIGN}(?:{_LATEX_FRAC}|\d+\s*/\s*\d+|{_DECIMAL})")
_FRAC_ARG = r"(\{[^{}]*\}|\d)"
_FRAC = re.compile(rf"\\[dt]?frac\s*{_FRAC_ARG}\s*{_FRAC_ARG}")
_TEXT_BLOCK = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{[^{}]*\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_REPLACEMENTS = (
    (r"{,}", ","),
    (r"\left", ""),
    (r"\right", ""),
    (r"\!", ""),
    (r"\,", ""),
    (r"\;", ""),
    (r"\%", ""),
    ("%", ""),
    ("$", ""),
    (r"^\circ", ""),
    (r"^{\circ}", ""),
    (r"\cdot", "*"),
    (r"\times", "*"),
    (r"\div", "/"),
)
_REL_TOL = Fraction(1, 10**6)
_ABS_TOL = Fraction(1, 10**9)  # only matters when the reference is 0, where a relative tolerance accepts only 0
_MAX_POWER_BITS = 4096  # `2^{10}` is fine; `9^{9^{9}}` is refused rather than computed by the reward worker


def math_reward(prompt: str, response: str, *, answer: str, **_: object) -> float:
    """1.0 when the response's final answer equals ``answer`` numerically (relative tolerance 1e-6), else 0.0.

    The final answer is the content of the last ``\\boxed{...}`` when there is one, else the last number in the
    response. Both sides accept integers, decimals, ``1,000``, ``a/b``, ``\\frac{a}{b}``, ``$5`` and ``5%``
    (compared as 5), and trailing words; boxed content may be a small expression (``2+3``, ``2^{10}``). A
    reference that is not a number is compared as a string with the boxed content, spaces removed.
    """
    boxed = last_boxed(response)
    candidate = boxed if boxed is not None else last_number_text(response)
    if candidate is None:
        return 0.0
    expected, got = parse_answer(answer), parse_answer(candidate)
    if expected is None:
        return float(boxed is not None and "".join(boxed.split()) == "".join(str(answer).split()))
    if got is None:
        return 0.0
    # Exact rationals all the way: no float overflow on huge values, no rounding on 1/3.
    return float(abs(got - expected) <= max(_REL_TOL * max(abs(got), abs(expected)), _ABS_TOL))


def format_reward(prompt: str, response: str, *, pattern: str = r"^\s*-?\d+\s*$", **_: object) -> float:
    """1.0 when ``re.search(pattern, response)`` matches, else 0.0.

    No flags are added: ``^`` and ``$`` anchor the whole response (so the default asks for a bare integer and
    nothing else). Put inline flags in the pattern to change that, e.g. ``(?m)`` or ``(?s)``.
    """
    return float(_compiled(pattern).search(response) is not None)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None; an unclosed box counts as absent."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def last_number_text(text: str) -> str | None:
    """The last number written in ``text`` (``-3``, ``1,000``, ``2.5``, ``1/2``, ``\\frac{1}{2}``), or None."""
    matches = _PROSE_NUMBER.findall(text)
    return matches[-1] if matches else None


def parse_answer(text: str) -> Fraction | None:
    """The value of an answer string: a small expression when the whole string is one, else its last number.

    A string made only of numbers and operators that does not evaluate (``1/0``, ``(1+2``, a refused power) has
    no value; its last number is not a stand-in for it.
    """
    text = str(text)
    normalized = _normalize(text)
    value = _evaluate(normalized)
    if value is None and not _EXPRESSION_ONLY.fullmatch(normalized):
        number = last_number_text(_TEXT_BLOCK.sub(" ", text)) or last_number_text(text)
        value = _evaluate(_normalize(number)) if number is not None else None
    return value


def evaluate(expression: str) -> Fraction | None:
    """Exact value of an arithmetic expression (``12*7``, ``2^{10}``, ``\\frac{1}{2}+1``), or None when it is not one."""
    return _evaluate(_normalize(expression))


def _normalize(text: str) -> str:
    text = _TEXT_BLOCK.sub("", text)
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    previous = None
    while previous != text:  # nested fractions unwrap from the inside out
        previous, text = text, _FRAC.sub(lambda m: f"({_unbrace(m[1])})/({_unbrace(m[2])})", text)
    text = _THOUSANDS.sub("", text)
    return text.replace("{", "(").replace("}", ")").strip().rstrip(".")


def _unbrace(arg: str) -> str:
    return arg[1:-1] if arg.startswith("{") else arg


_EXPRESSION_ONLY = re.compile(r"[\d\s.eE+\-*/^()]*")
_TOKEN = re.compile(r"\s*(?:((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?)|(\*\*|[-+*/^()]))")


def _evaluate(expression: str) -> Fraction | None:
    """Exact value of + - * / ^ and parentheses over decimal numbers; None for anything else. Never calls eval."""
    tokens: list[str] = []
    position = 0
    expression = expression.strip()
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        if match is None:
            return None
        tokens.append(match[1] or ("^" if match[2] == "**" else match[2]))
        position = match.end()
        while position < len(expression) and expression[position].isspace():
            position += 1
    if not tokens:
        return None
    try:
        value, rest = _sum(tokens)
    except (ValueError, ZeroDivisionError, OverflowError, IndexError):
        return None
    return value if not rest else None


def _sum(tokens: list[str]) -> tuple[Fraction, list[str]]:
    value, tokens = _product(tokens)
    while tokens and tokens[0] in "+-":
        op, (right, tokens) = tokens[0], _product(tokens[1:])
        value = value + right if op == "+" else value - right
    return value, tokens


def _product(tokens: list[str]) -> tuple[Fraction, list[str]]:
    value, tokens = _unary(tokens)
    while tokens and tokens[0] in ("*", "/"):
        op, (right, tokens) = tokens[0], _unary(tokens[1:])
        value = value * right if op == "*" else value / right
    return value, tokens


def _unary(tokens: list[str]) -> tuple[Fraction, list[str]]:
    if tokens[0] in ("+", "-"):
        value, rest = _unary(tokens[1:])
        return (-value if tokens[0] == "-" else value), rest
    return _power(tokens)


def _power(tokens: list[str]) -> tuple[Fraction, list[str]]:
    base, tokens = _atom(tokens)
    if tokens and tokens[0] == "^":
        exponent, tokens = _unary(tokens[1:])  # right-associative: 2^3^2 = 2^9
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if exponent.denominator != 1 or size * abs(exponent) > _MAX_POWER_BITS:
            raise ValueError("exponent must be an integer and the power small")
        base = base ** int(exponent)
    return base, tokens


def _atom(tokens: list[str]) -> tuple[Fraction, list[str]]:
    token = tokens[0]
    if token == "(":
        value, rest = _sum(tokens[1:])
        if not rest or rest[0] != ")":
            raise ValueError("unbalanced parenthesis")
        return value, rest[1:]
    if token[0].isdigit() or token[0] == ".":
        return Fraction(token), tokens[1:]
    raise ValueError(f"unexpected {token!r}")


_PYTHON_BLOCK = re.compile(r"```(?:python|py)[^\n]*\n(.*?)```", re.DOTALL)


def code_reward(
    prompt: str, response: str, *, tests: str, timeout_s: float = 5.0, memory_mb: int = 256, **_: object
) -> float:
    """1.0 when the response's code, followed by ``tests`` (assert statements), exits 0 in the sandbox, else 0.0.

    The code is the last fenced ```python block, or the whole response when there is none. A wrong answer, a
    crash, a timeout or a resource kill all score 0.0; only a sandbox that cannot be set up raises.
    """
    from asyncrl.sandbox import run_python  # imported here so reward modules without code tasks never load it

    blocks = _PYTHON_BLOCK.findall(response)
    code = blocks[-1] if blocks else response
    result = run_python(f"{code}\n\n{tests}\n", timeout_s=timeout_s, memory_mb=memory_mb)
    return float(result.returncode == 0 and not result.timed_out)
