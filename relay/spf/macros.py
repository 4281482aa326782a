"""SPF macro strings (RFC 7208 §7): parsing, syntax checks and expansion.

A macro string is parsed once into tokens (literal text and `Macro`s) so that a record's
syntax is fully checked before anything is evaluated (§4.6), and expanded later with the
values of one `check_host()` call.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

# §7.2: c, r and t only make sense in explanation text.
DOMAIN_LETTERS = frozenset("slodiphv")
ALL_LETTERS = DOMAIN_LETTERS | frozenset("crt")
_BODY = re.compile(r"([a-zA-Z])([0-9]*)([rR]?)([.\-+,/_=]*)")
# §7.1: toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
_TOPLABEL = re.compile(r"[a-zA-Z0-9]*[a-zA-Z][a-zA-Z0-9]*|[a-zA-Z0-9]+-[a-zA-Z0-9-]*[a-zA-Z0-9]")


class MacroSyntaxError(ValueError):
    """The text is not a valid macro-string / domain-spec."""


@dataclass(frozen=True, slots=True)
class Macro:
    """One `%{...}` expansion: letter, transformers (§7.3) and whether to URL-escape."""

    letter: str  # lower case
    keep: int | None  # number of right-hand parts to keep
    reverse: bool
    delimiters: str
    url_escape: bool  # upper-case letter in the record


Token = str | Macro
MacroString = tuple[Token, ...]


def parse_macro_string(text: str, *, letters: frozenset[str] = DOMAIN_LETTERS, spaces: bool = False) -> MacroString:
    """Tokenise `text`; `spaces` allows SP (explanation-string, §6.2)."""
    tokens, _, _ = _parse(text, letters, spaces)
    return tokens


def parse_domain_spec(text: str) -> MacroString:
    """A domain-spec (§7.1): a macro-string ending in a macro or in "." toplabel ["."]."""
    if not text:
        raise MacroSyntaxError("empty domain-spec")
    tokens, ends_in_macro, tail = _parse(text, DOMAIN_LETTERS, False)
    if not ends_in_macro:
        # Why: "a:foo-bar", "a:111.222.33.44", "a:museum." are syntax errors, not lookups.
        body = tail[:-1] if tail.endswith(".") else tail
        head, dot, top = body.rpartition(".")
        if not dot or not _TOPLABEL.fullmatch(top):
            raise MacroSyntaxError(f"domain-spec {text!r} does not end in a valid top label")
    return tokens


def _parse(text: str, letters: frozenset[str], spaces: bool) -> tuple[MacroString, bool, str]:
    """Return (tokens, whether the text ends in a macro-expand, raw literal text after it)."""
    tokens: list[Token] = []
    literal: list[str] = []
    tail = ""  # raw text since the last macro-expand, for the domain-end check
    ends_in_macro = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "%":
            # macro-literal = %x21-24 / %x26-7E: visible ASCII only (control chars, NUL and
            # non-ASCII are syntax errors, §7.1).
            if not ("\x21" <= ch <= "\x7e" or (spaces and ch == " ")):
                raise MacroSyntaxError(f"invalid character {ch!r} in {text!r}")
            literal.append(ch)
            tail += ch
            ends_in_macro = False
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt in ("%", "_", "-"):
            # §7.1: "%%" is "%", "%_" a space, "%-" a URL-encoded space.
            literal.append({"%": "%", "_": " ", "-": "%20"}[nxt])
            i += 2
        elif nxt == "{":
            end = text.find("}", i + 2)
            match = _BODY.fullmatch(text, i + 2, end) if end > 0 else None
            if match is None:
                raise MacroSyntaxError(f"malformed macro in {text!r}")
            letter, digits, reverse, delimiters = match.groups()
            if letter.lower() not in letters:
                raise MacroSyntaxError(f"macro letter {letter!r} not allowed here")
            if digits and int(digits) == 0:
                raise MacroSyntaxError("macro transformer digit must be nonzero (§7.3)")
            if literal:
                tokens.append("".join(literal))
                literal = []
            tokens.append(
                Macro(
                    letter=letter.lower(),
                    keep=int(digits) if digits else None,
                    reverse=bool(reverse),
                    delimiters=delimiters or ".",
                    url_escape=letter.isupper(),
                )
            )
            i = end + 1
        else:
            # §7.1: a "%" not followed by "{", "%", "-" or "_" is a syntax error.
            raise MacroSyntaxError(f"stray '%' in {text!r}")
        ends_in_macro = True
        tail = ""
    if literal:
        tokens.append("".join(literal))
    return tuple(tokens), ends_in_macro, tail


def letters_used(tokens: MacroString) -> set[str]:
    return {t.letter for t in tokens if isinstance(t, Macro)}


async def expand(
    tokens: MacroString,
    values: Mapping[str, str],
    ptr_name: Callable[[], Awaitable[str]] | None = None,
) -> str:
    """Expand `tokens`; `values` maps letters to raw values, `ptr_name` computes %{p} lazily
    (it costs DNS queries, §7.3)."""
    out: list[str] = []
    for token in tokens:
        if isinstance(token, str):
            out.append(token)
            continue
        if token.letter == "p":
            raw = await ptr_name() if ptr_name is not None else "unknown"
        else:
            raw = values[token.letter]
        out.append(_transform(raw, token))
    return "".join(out)


def _transform(value: str, macro: Macro) -> str:
    # §7.3: split on the delimiters, optionally reverse, keep the right-hand N parts, join
    # with "."; upper-case letters are then URL-escaped (all but the unreserved set).
    parts = re.split("[" + re.escape(macro.delimiters) + "]", value)
    if macro.reverse:
        parts.reverse()
    if macro.keep is not None:
        parts = parts[-macro.keep :]
    result = ".".join(parts)
    return quote(result, safe="~") if macro.url_escape else result
