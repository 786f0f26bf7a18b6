"""The configuration file: one INI section, ``[niki]``, read with :mod:`configparser`.

This module knows the file format only; which keys exist and how each value
converts is the caller's table (``settings.CONFIG_OPTIONS``).  It is strict on
purpose: a misspelt key or an unknown section is an error, not silently
ignored, because a setting that is quietly dropped (a ``max_conections``
limit, a ``[Niki]`` section) is worse than a server that refuses to start.

Every error is a :class:`~messaging_server.errors.ConfigurationError` whose
message names the file and, where there is one, the line and the key.

Keys are accepted with dashes or underscores (``event-port``, ``event_port``)
and in any case; an empty value counts as unset, like an empty environment
variable.  Values are taken literally: no ``%`` interpolation (percent-encoded
passwords in database URLs stay as written) and no comments after a value.
"""

from __future__ import annotations

import argparse
import configparser
import difflib
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

from messaging_server.errors import ConfigurationError

SECTION = "niki"
# configparser treats a section of this name as defaults for every other one;
# no header can name the empty string, so [DEFAULT] is an ordinary (unknown) section.
_NO_DEFAULT_SECTION = ""
_SECTION_LINE = re.compile(r"\s*\[(?P<name>.+)\]\s*$")
_KEY_LINE = re.compile(r"\s*(?P<key>[^=:\s][^=:]*?)\s*[=:]")

Converter = Callable[[str], object]


@dataclass(frozen=True)
class Entry:
    """One key of the file: its canonical name, the text as written, the converted value."""

    key: str
    text: str
    value: object
    line: int


def canonical_key(key: str) -> str:
    """``Event-Port`` -> ``event_port``: the spelling the caller's table uses."""
    return key.strip().lower().replace("-", "_")


def read_config(path: str, converters: Mapping[str, Converter]) -> Dict[str, Entry]:
    """The set keys of ``path``'s ``[niki]`` section, converted; ConfigurationError otherwise.

    ``converters`` maps each known key (canonical spelling) to the function that
    converts and validates its text, raising ValueError (argparse's
    ArgumentTypeError included) with the reason when the text is wrong.
    """
    text = _read_text(path)
    parser = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULT_SECTION,
                                       empty_lines_in_values=False)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigurationError(_syntax_error(path, text, exc)) from None
    lines = _line_numbers(text)
    for name in parser.sections():
        if name != SECTION:
            raise ConfigurationError(f"{_where(path, lines.get((name, None)))}unknown section "
                                     f"[{name}]: the settings go in [{SECTION}]")
    entries: Dict[str, Entry] = {}
    if not parser.has_section(SECTION):
        return entries
    for raw_key, raw_value in parser.items(SECTION):
        line = lines.get((SECTION, raw_key))
        key = canonical_key(raw_key)
        if key not in converters:
            raise ConfigurationError(f"{_where(path, line)}unknown key {raw_key!r} in [{SECTION}]"
                                     f"{_suggestion(key, converters)}")
        if key in entries:
            raise ConfigurationError(f"{_where(path, line)}{key} is set twice (also on line "
                                     f"{entries[key].line})")
        value = raw_value.strip()
        if "\n" in value:
            raise ConfigurationError(f"{_where(path, line)}{raw_key}: a value must fit on one line "
                                     "(an indented line continues the value above it)")
        if not value:  # like an empty environment variable: unset, the default applies
            continue
        entries[key] = Entry(key, value, _convert(path, line, raw_key, value, converters[key]),
                             line or 0)
    return entries


def render(entries: Iterable[Tuple[str, str, str]], header: Iterable[str] = ()) -> str:
    """An INI text of ``(key, value, comment)`` rows: each comment on its own line above its key."""
    out = [f"# {line}" if line else "#" for line in header]
    out.append(f"[{SECTION}]")
    for key, value, comment in entries:
        out.append(f"# {comment}")
        out.append(f"{key} = {value}".rstrip())
    return "\n".join(out) + "\n"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: cannot read: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _syntax_error(path: str, text: str, exc: configparser.Error) -> str:
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"{path}: line {exc.lineno}: {exc.line.strip()!r} comes before any section: " \
               f"start the file with [{SECTION}]"
    if isinstance(exc, configparser.ParsingError):
        lineno = exc.errors[0][0]  # the line it holds is repr()'d: take the file's own
        line = text.split("\n")[lineno - 1].strip()
        return f"{path}: line {lineno}: not a 'key = value' line: {line!r}"
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"{path}: line {exc.lineno}: {exc.option} is set twice in [{exc.section}]"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"{path}: line {exc.lineno}: section [{exc.section}] appears twice"
    return f"{path}: {exc}"


def _line_numbers(text: str) -> Dict[Tuple[str, Optional[str]], int]:
    """Where each section header, and each key of each section, first appears.

    configparser keeps no line numbers; the file already parsed, a plain scan
    finds them: ``(section, None)`` for a header, ``(section, key)`` for a key.
    """
    found: Dict[Tuple[str, Optional[str]], int] = {}
    section: Optional[str] = None
    for number, line in enumerate(text.split("\n"), 1):  # as configparser counts
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        header = _SECTION_LINE.match(line)
        if header:
            section = header.group("name")
            found.setdefault((section, None), number)
            continue
        key = _KEY_LINE.match(line)
        if key and section is not None:
            found.setdefault((section, key.group("key").lower()), number)
    return found


def _where(path: str, line: Optional[int]) -> str:
    return f"{path}: line {line}: " if line else f"{path}: "


def _suggestion(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(path: str, line: Optional[int], raw_key: str, text: str, convert: Converter) -> object:
    try:
        return convert(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        hint = " (comments go on a line of their own)" if re.search(r"\s[#;]", text) else ""
        raise ConfigurationError(f"{_where(path, line)}{raw_key} = {text}: {exc}{hint}") from None
