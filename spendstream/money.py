"""Money inputs -> integer nano-USD, and the caps that keep every amount inside its column. Pure.

Parsing
-------
Every decimal money input (an event's ``cost_usd``, a budget check's ``estimated_cost_usd``, a
budget's ``limit_usd``, override prices, :func:`spendstream.contracts.usd_to_nanos`) goes through
:meth:`MoneyRule.nanos`. Accepted: a JSON string or number in decimal notation, optionally with
an exponent (``"1E+2"``, and the shortest ``repr`` of a float such as ``3.3e-05``, which is how
a JSON float is read: never float arithmetic). The cost is linear in the input's length and
nothing larger than the field's range is ever built:

- a string longer than :data:`MAX_MONEY_CHARS` is refused before it is looked at;
- the rest is split into sign, digits and exponent with integer arithmetic only (no ``Decimal``
  of the input), and an exponent is applied only after the number of integer digits it would
  produce (digits + exponent) is checked against the range, so ``"1e999999999"`` is refused
  and ``"1e-999999999"`` is below a nano-USD, both without building a big number;
- at most 9 decimal places (one nano-USD; zeros beyond are fine): a finer input is refused.
  Only :data:`INT64_AMOUNT` (``usd_to_nanos``, for amounts Spendstream computes itself, such as
  genai-prices totals) rounds instead, once, half to even;
- NaN, Infinity, booleans and anything that is not a string or number are refused;
- then the rule's inclusive range in nano-USD.

A refusal is a :class:`MoneyError` (a ``ValueError``) carrying the field's name; the services turn
it into a 4xx naming the field.

Caps (the arithmetic, checked at import below)
----------------------------------------------
Int64 holds 9,223,372,036,854,775,807 nano-USD (about 9.2 billion USD).

- :data:`MAX_TOKENS_PER_EVENT` = 10^8 per token field: ten times the largest context window any
  model offers (10M tokens), so only a client bug or an attack reaches it. Token subsets are
  parts of ``input_tokens`` / ``output_tokens`` and the priced classes are disjoint, so an event
  prices at most ``input + output <= 2 * 10^8`` tokens = 200 MTok.
- :data:`MAX_PRICE_PER_MTOK_NANOS` = 4,000 USD per million tokens (an override price): about
  seven times the dearest catalog price (600 USD/MTok, o1-pro output).
- :data:`MAX_PRICE_PER_REQUEST_NANOS` = 10,000 USD per request (catalog maximum: 0.014 USD).
- :data:`MAX_EVENT_COST_NANOS` = 1,000,000 USD (10^15 nano-USD), the cap on one event's cost,
  client-given (``cost_usd``) or computed. An override prices one event at most
  200 MTok * 4,000 USD + 10,000 USD = 810,000 USD <= 1,000,000 USD, and a catalog price at most
  200 MTok * 600 USD = 120,000 USD; the cap is 9,223 times below Int64, so a per-event Int64
  column and the breakdown by class never overflow.
- :data:`MAX_BUDGET_LIMIT_NANOS` = 1,000,000,000 USD (10^18 nano-USD): above any realistic
  budget, and 9 times below Int64, so a window's spend and projection can reach 9 times the
  highest limit within the Int64 fields of budget state and alerts.
- The budget check's ``estimated_cost_usd`` is one call's cost: capped like one event.

Aggregates: :data:`MAX_EVENTS_PER_YEAR` = 10^13 bounds what one deployment ingests in a year
(the design target, 30,000 events/s, is 9.5 * 10^11 a year). A year of events all at the
per-event cap sums to at most 10^13 * 10^15 = 10^28 nano-USD: that fits Int128 (1.7 * 10^38)
and Decimal(38, 0) with ten orders of magnitude to spare, but Int64 holds only 9,223 such
events, so every column that sums costs over time must be Int128 (or Decimal(38, ...)), not Int64.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

NANOS_PER_USD = 1_000_000_000
DECIMAL_PLACES = 9
INT64_MAX = 2**63 - 1
INT128_MAX = 2**127 - 1

MAX_TOKENS_PER_EVENT = 10**8
MAX_PRICE_PER_MTOK_NANOS = 4_000 * NANOS_PER_USD
MAX_PRICE_PER_REQUEST_NANOS = 10_000 * NANOS_PER_USD
MAX_EVENT_COST_NANOS = 1_000_000 * NANOS_PER_USD
MAX_BUDGET_LIMIT_NANOS = 1_000_000_000 * NANOS_PER_USD
MAX_EVENTS_PER_YEAR = 10**13

#: longer than any amount written by hand or by repr(float) (at most 24 characters)
MAX_MONEY_CHARS = 64

#: the most one override can charge for one event: input + output tokens (every subset is part
#: of one of them) at the highest price, plus the per-request price
MAX_OVERRIDE_EVENT_NANOS = 2 * MAX_TOKENS_PER_EVENT * MAX_PRICE_PER_MTOK_NANOS // 10**6 + MAX_PRICE_PER_REQUEST_NANOS
if not (
    MAX_OVERRIDE_EVENT_NANOS <= MAX_EVENT_COST_NANOS < INT64_MAX
    and MAX_BUDGET_LIMIT_NANOS < INT64_MAX
    and MAX_EVENTS_PER_YEAR * MAX_EVENT_COST_NANOS < INT128_MAX
):
    raise RuntimeError("spendstream.money caps no longer fit their columns; see the module docstring")

# ASCII digits only: str patterns' \d would also take other scripts' digits, which int() accepts
_NUMBER = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?[0-9]+))?")
#: beyond this many integer digits a value exceeds every range here (Int64 has 19)
_MAX_INTEGER_DIGITS = 20


class MoneyError(ValueError):
    """A money input refused; ``field`` names it, ``str(exc)`` says why (without the name)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def format_usd(nanos: int) -> str:
    """Plain decimal USD without trailing zeros: 10_000_000 -> '0.01', 3 * 10**9 -> '3'."""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return f"-{text}" if nanos < 0 else text


@dataclass(frozen=True, slots=True)
class MoneyRule:
    """How one money field is read: its name in errors, its inclusive range in nano-USD, whether
    finer than a nano-USD is refused (every input) or rounded (amounts computed here), and whether
    a float is taken (via its shortest repr)."""

    field: str
    min_nanos: int
    max_nanos: int
    round_sub_nano: bool = False
    floats: bool = True

    def nanos(self, value: Any, field: str | None = None) -> int:
        """``value`` (str, int, float or Decimal, in USD) as integer nano-USD, or MoneyError."""
        name = field or self.field
        kind = type(value)
        if kind is str:
            nanos = self._from_text(value, name)
        elif kind is int:
            # compared before multiplying: a 4,000-digit JSON integer stays cheap
            if not -INT64_MAX <= value <= INT64_MAX:
                raise self._range_error(name)
            nanos = value * NANOS_PER_USD
        elif kind is float:
            if not self.floats:
                raise MoneyError(name, "give a decimal string, not a float (money is never float)")
            if not math.isfinite(value):
                raise MoneyError(name, f"must be a finite decimal number {self._range_text()}")
            nanos = self._from_text(repr(value), name)  # the shortest repr: what the JSON said
        elif isinstance(value, Decimal):
            nanos = self._from_decimal(value, name)
        else:
            raise MoneyError(name, 'must be a decimal string such as "0.10" or a number')
        if not self.min_nanos <= nanos <= self.max_nanos:
            raise self._range_error(name)
        return nanos

    def usd(self, value: Any, field: str | None = None) -> Decimal:
        """The same check, the amount as an exact Decimal of USD (9 decimal places)."""
        return Decimal(self.nanos(value, field)).scaleb(-DECIMAL_PLACES)

    def _from_text(self, text: str, name: str) -> int:
        if len(text) > MAX_MONEY_CHARS:
            raise MoneyError(name, f"at most {MAX_MONEY_CHARS} characters")
        match = _NUMBER.fullmatch(text.strip())
        if match is None or not (match[2] or match[3]):
            lowered = text.strip().lower().lstrip("+-")
            if lowered in ("nan", "snan", "inf", "infinity"):
                raise MoneyError(name, f"must be a finite decimal number {self._range_text()}")
            raise MoneyError(name, f"not a decimal number: {text[:32]!r}")
        sign, whole, frac, exponent = match.groups()
        frac = frac or ""
        return self._scaled(sign == "-", whole + frac, int(exponent or 0) - len(frac), name)

    def _from_decimal(self, value: Decimal, name: str) -> int:
        if not value.is_finite():
            raise MoneyError(name, f"must be a finite decimal number {self._range_text()}")
        sign, digits, exponent = value.as_tuple()
        if len(digits) > MAX_MONEY_CHARS:
            raise MoneyError(name, f"at most {MAX_MONEY_CHARS} digits")
        return self._scaled(bool(sign), "".join(map(str, digits)), int(exponent), name)

    def _scaled(self, negative: bool, digits: str, exponent: int, name: str) -> int:
        """``±int(digits) * 10**exponent`` USD in nano-USD; ``digits`` is at most 64 characters."""
        digits = digits.lstrip("0")
        if not digits:
            return 0
        shift = exponent + DECIMAL_PLACES  # nanos = int(digits) * 10**shift
        if shift >= 0:
            if len(digits) + shift > _MAX_INTEGER_DIGITS:
                raise self._range_error(name)
            nanos = int(digits) * 10**shift
        elif -shift > len(digits):  # below a tenth of a nano-USD: nothing to keep
            if not self.round_sub_nano:
                raise MoneyError(name, f"at most {DECIMAL_PLACES} decimal places (nano-USD)")
            nanos = 0
        else:
            nanos, rest = divmod(int(digits), 10**-shift)
            if rest:
                if not self.round_sub_nano:
                    raise MoneyError(name, f"at most {DECIMAL_PLACES} decimal places (nano-USD)")
                half = 10**-shift
                if 2 * rest > half or (2 * rest == half and nanos % 2):
                    nanos += 1
        return -nanos if negative else nanos

    def _range_error(self, name: str) -> MoneyError:
        return MoneyError(name, f"must be {self._range_text()}")

    def _range_text(self) -> str:
        low = "> 0" if self.min_nanos == 1 else f">= {format_usd(self.min_nanos)}"
        return f"{low} and <= {format_usd(self.max_nanos)}"


EVENT_COST = MoneyRule("cost_usd", 0, MAX_EVENT_COST_NANOS)
ESTIMATED_COST = MoneyRule("estimated_cost_usd", 0, MAX_EVENT_COST_NANOS)
BUDGET_LIMIT = MoneyRule("limit_usd", 1, MAX_BUDGET_LIMIT_NANOS)
PRICE_PER_MTOK = MoneyRule("per_mtok", 0, MAX_PRICE_PER_MTOK_NANOS, floats=False)
PRICE_PER_REQUEST = MoneyRule("per_request_usd", 0, MAX_PRICE_PER_REQUEST_NANOS, floats=False)
#: an amount computed here (a genai-prices total...) that fits Int64 nano-USD, rounded to the nano;
#: contracts.usd_to_nanos
INT64_AMOUNT = MoneyRule("amount", -INT64_MAX, INT64_MAX, round_sub_nano=True)
