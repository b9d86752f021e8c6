"""The IVR menu file (TOML, `INBOX_IVR_CONFIG`): the model and the checker that names every
problem with its place (`nodes.billing.options[2].digit: digit 2 is already used ...`).

A menu is a set of named nodes. A *menu node* says its prompt and waits for a key or a spoken
keyword (`options`); no input or an invalid one repeats the prompt up to `repeats` times, then
the node's `default` action runs. An *action node* (`action = ...` in the node itself) says its
optional prompt and runs its action at once, e.g. a business-hours branch.

Actions: `menu` (go to `node`), `queue` (`queue`, `skill`, `priority`), `supervisor` (a queue,
"supervisors" unless named, reported as a supervisor request), `callback` (offer a callback for
`queue`), `voicemail`, `transfer` (to an E.164 `number`), `hangup`, `hours` (`hours` calendar,
`open` and `closed` nodes), `language` (switch to `language`, go on to `node`).

See ivr/menus/example.toml and docs/ivr.md for the format. Parsing and checking are one pass:
`parse_menu(data)` returns the model only when there are no problems.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import phonenumbers

from inbox.domain.business_hours import BusinessHours, CalendarError
from inbox.domain.conversation import MAX_PRIORITY
from ivr.phrases import BUILT_IN, PLACEHOLDERS, fields_of

DEFAULT_QUEUE = "default"
SUPERVISOR_QUEUE = "supervisors"
BUNDLED_EXAMPLE = Path(__file__).parent / "menus" / "example.toml"
DIGITS = frozenset("0123456789*#")
MAX_REPEATS = 5
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}\Z")
# Twilio's <Say>/<Gather> locales: en-US, de-DE, cmn-Hans-CN, ...
_LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,4}){1,2}\Z")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}\Z")
_URL = re.compile(r"^https?://\S+\Z")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Problem:
    place: str
    message: str

    def __str__(self) -> str:
        return f"{self.place}: {self.message}"


class InvalidMenu(ValueError):
    """A menu file with problems; `problems` names each with its place."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"{source}: {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the IVR menu:\n{lines}")


@dataclass(frozen=True)
class Voice:
    """How a language is spoken and heard: the Twilio locale and the <Say> voice."""

    locale: str
    voice: str | None = None


@dataclass(frozen=True)
class Prompt:
    """One language's prompt: text (spoken with the language's voice or its own) or audio."""

    text: str | None = None
    audio: str | None = None
    voice: str | None = None


@dataclass(frozen=True)
class GoTo:
    node: str


@dataclass(frozen=True)
class Enqueue:
    queue: str
    skill: str | None = None
    priority: int = 0
    # "supervisor" marks a request for a supervisor (escalation), else "queue".
    label: str = "queue"


@dataclass(frozen=True)
class OfferCallback:
    queue: str = DEFAULT_QUEUE


@dataclass(frozen=True)
class Voicemail:
    queue: str = DEFAULT_QUEUE


@dataclass(frozen=True)
class Transfer:
    number: str


@dataclass(frozen=True)
class HangUp:
    pass


@dataclass(frozen=True)
class HoursBranch:
    hours: str
    open: str
    closed: str


@dataclass(frozen=True)
class ChooseLanguage:
    language: str
    node: str


Action = (
    GoTo | Enqueue | OfferCallback | Voicemail | Transfer | HangUp | HoursBranch | ChooseLanguage
)
TERMINAL_ACTIONS = (Enqueue, OfferCallback, Voicemail, Transfer, HangUp)


def action_name(action: Action) -> str:
    """The `action` of the `ivr.selected` payload."""
    match action:
        case GoTo():
            return "menu"
        case Enqueue(label=label):
            return label
        case OfferCallback():
            return "callback"
        case Voicemail():
            return "voicemail"
        case Transfer():
            return "transfer"
        case HangUp():
            return "hangup"
        case HoursBranch():
            return "hours"
        case ChooseLanguage():
            return "language"


def targets(action: Action) -> tuple[str, ...]:
    """The nodes an action leads to."""
    match action:
        case GoTo(node=node) | ChooseLanguage(node=node):
            return (node,)
        case HoursBranch(open=open_node, closed=closed_node):
            return (open_node, closed_node)
        case _:
            return ()


@dataclass(frozen=True)
class Option:
    index: int
    action: Action
    digit: str | None = None
    # language -> keywords as written (the recogniser's hints)
    speech: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # language -> keywords as compared with what the caller said (see normalise_speech)
    keywords: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def token(self) -> str:
        """How the option appears in a call's path: its digit, else `o<index>`."""
        return self.digit if self.digit is not None else f"o{self.index}"


@dataclass(frozen=True)
class Node:
    name: str
    prompt: Mapping[str, Prompt]
    options: tuple[Option, ...] = ()
    default: Action | None = None
    action: Action | None = None
    repeats: int = 2
    timeout: int = 5
    # Say the prompt in every language in turn (a language choice), each with its own voice.
    multilingual: bool = False

    @property
    def is_menu(self) -> bool:
        return self.action is None

    def actions(self) -> Iterator[Action]:
        if self.action is not None:
            yield self.action
        for option in self.options:
            yield option.action
        if self.default is not None:
            yield self.default


@dataclass(frozen=True)
class Menu:
    start: str
    languages: Mapping[str, Voice]
    default_language: str
    nodes: Mapping[str, Node]
    hours: Mapping[str, BusinessHours] = field(default_factory=dict)
    phrases: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    hold_music: str | None = None
    voicemail_seconds: int = 120

    def phrase(self, language: str, key: str, **values: object) -> str:
        table = self.phrases.get(language) or self.phrases[self.default_language]
        return table[key].format(**values)

    def voice(self, language: str) -> Voice:
        return self.languages.get(language) or self.languages[self.default_language]


# --------------------------------------------------------------------------- loading


def load_menu(path: str | Path, known_queues: set[str] | None = None) -> Menu:
    """The menu in the TOML file at `path`; InvalidMenu names every problem."""
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidMenu(
            source, [Problem("file", f"cannot read: {exc.strerror or exc}")]
        ) from None
    except UnicodeDecodeError:
        raise InvalidMenu(source, [Problem("file", "not UTF-8 text")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidMenu(source, [Problem("toml", str(exc))]) from None
    menu, problems = parse_menu(data, known_queues)
    if menu is None:
        raise InvalidMenu(source, problems)
    return menu


def load_bundled_example() -> Menu:
    return load_menu(BUNDLED_EXAMPLE)


def check_menu(data: Mapping[str, Any], known_queues: set[str] | None = None) -> list[Problem]:
    """Every problem of a parsed TOML menu, each with its place; empty when it is valid."""
    return parse_menu(data, known_queues)[1]


def parse_menu(
    data: Mapping[str, Any], known_queues: set[str] | None = None
) -> tuple[Menu | None, list[Problem]]:
    """The model and no problems, or None and the problems."""
    parser = _Parser(known_queues)
    menu = parser.menu(data)
    return (menu if not parser.problems else None), parser.problems


# --------------------------------------------------------------------------- parsing


_TOP_KEYS = ("menu", "languages", "hours", "phrases", "nodes")
_MENU_KEYS = ("start", "default_language", "repeats", "timeout", "hold_music", "voicemail_seconds")
_NODE_KEYS = ("prompt", "options", "default", "repeats", "timeout", "multilingual")
_OPTION_KEYS = ("digit", "speech")
_ACTION_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "menu": ("node",),
        "queue": ("queue", "skill", "priority"),
        "supervisor": ("queue", "skill", "priority"),
        "callback": ("queue",),
        "voicemail": ("queue",),
        "transfer": ("number",),
        "hangup": (),
        "hours": ("hours", "open", "closed"),
        "language": ("language", "node"),
    }
)


class _Parser:
    def __init__(self, known_queues: set[str] | None) -> None:
        self.known_queues = None if known_queues is None else {*known_queues, DEFAULT_QUEUE}
        self.problems: list[Problem] = []
        self.languages: dict[str, Voice] = {}
        self.hours_names: set[str] = set()
        # (place, node name) of every reference, checked once all nodes are known
        self.references: list[tuple[str, str]] = []

    def problem(self, place: str, message: str) -> None:
        self.problems.append(Problem(place, message))

    # --- small typed readers ------------------------------------------------------------------

    def table(self, value: object, place: str) -> Mapping[str, Any] | None:
        if isinstance(value, Mapping):
            return value
        self.problem(place, f"expected a table, got {_kind(value)}")
        return None

    def string(self, value: object, place: str) -> str | None:
        if isinstance(value, str) and value.strip():
            return value.strip()
        if value is None:
            self.problem(place, "missing")
        else:
            self.problem(place, f"expected a non-empty string, got {_kind(value)}")
        return None

    def integer(self, value: object, place: str, low: int, high: int) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        self.problem(place, f"expected a whole number from {low} to {high}, got {value!r}")
        return None

    def known_keys(self, table: Mapping[str, Any], allowed: Iterable[str], place: str) -> None:
        allowed = tuple(allowed)
        for key in table:
            if key not in allowed:
                self.problem(_join(place, key), f"unknown key (expected {', '.join(allowed)})")

    # --- the file -----------------------------------------------------------------------------

    def menu(self, data: Mapping[str, Any]) -> Menu | None:
        self.known_keys(data, _TOP_KEYS, "")
        settings = self.table(data.get("menu", {}), "menu") or {}
        self.known_keys(settings, _MENU_KEYS, "menu")
        self.languages = self.parse_languages(data.get("languages"))
        default_language = self.parse_default_language(settings)
        repeats = self.integer(settings.get("repeats", 2), "menu.repeats", 0, MAX_REPEATS)
        timeout = self.integer(settings.get("timeout", 5), "menu.timeout", 1, 60)
        hold_music = self.url(settings.get("hold_music"), "menu.hold_music")
        voicemail_seconds = self.integer(
            settings.get("voicemail_seconds", 120), "menu.voicemail_seconds", 5, 3600
        )
        hours = self.parse_hours(data.get("hours", {}))
        phrases = self.parse_phrases(data.get("phrases", {}))
        nodes = self.parse_nodes(data.get("nodes"), repeats or 2, timeout or 5)
        start = self.string(settings.get("start"), "menu.start") if "start" in settings else None
        if "start" not in settings:
            self.problem("menu.start", "missing: the name of the first node")
        elif start is not None:
            self.references.append(("menu.start", start))
        for place, name in self.references:
            if name not in nodes:
                self.problem(place, f"unknown node {name!r}{_choices(nodes)}")
        if start is not None and start in nodes:
            self.check_graph(start, nodes)
        if self.problems or start is None or default_language is None:
            return None
        return Menu(
            start=start,
            languages=MappingProxyType(self.languages),
            default_language=default_language,
            nodes=MappingProxyType(nodes),
            hours=MappingProxyType(hours),
            phrases=MappingProxyType(phrases),
            hold_music=hold_music,
            voicemail_seconds=voicemail_seconds or 120,
        )

    def url(self, value: object, place: str) -> str | None:
        if value is None:
            return None
        if isinstance(value, str) and _URL.match(value.strip()):
            return value.strip()
        self.problem(place, f"expected an http(s) URL, got {value!r}")
        return None

    def parse_languages(self, value: object) -> dict[str, Voice]:
        if value is None:
            self.problem("languages", "missing: at least one [languages.CODE] with its locale")
            return {}
        table = self.table(value, "languages")
        if table is None:
            return {}
        if not table:
            self.problem("languages", "no language: declare at least one")
        languages: dict[str, Voice] = {}
        for code, spec in table.items():
            place = f"languages.{code}"
            if not _LANGUAGE_CODE.match(code):
                self.problem(place, f"bad language code {code!r} (two or three letters, e.g. en)")
                continue
            entry = self.table(spec, place)
            if entry is None:
                continue
            self.known_keys(entry, ("locale", "voice"), place)
            locale = entry.get("locale")
            if not (isinstance(locale, str) and _LOCALE.match(locale)):
                self.problem(
                    f"{place}.locale", f"bad language locale {locale!r} (e.g. en-US, de-DE)"
                )
                locale = str(locale)  # kept, so its prompts are not reported as well
            voice = entry.get("voice")
            if voice is not None:
                voice = self.string(voice, f"{place}.voice")
            languages[code] = Voice(locale, voice)
        return languages

    def parse_default_language(self, settings: Mapping[str, Any]) -> str | None:
        value = settings.get("default_language")
        if value is None:
            return next(iter(self.languages), None)
        if isinstance(value, str) and value in self.languages:
            return value
        self.problem("menu.default_language", f"bad language {value!r}{self.declared()}")
        return None

    def declared(self) -> str:
        return f" (declared: {', '.join(self.languages) or 'none'})"

    def language(self, code: object, place: str) -> str | None:
        if isinstance(code, str) and code in self.languages:
            return code
        self.problem(place, f"bad language {code!r}{self.declared()}")
        return None

    def parse_hours(self, value: object) -> dict[str, BusinessHours]:
        table = self.table(value, "hours")
        calendars: dict[str, BusinessHours] = {}
        for name, spec in (table or {}).items():
            self.hours_names.add(name)
            try:
                calendars[name] = BusinessHours.from_dict(spec, where=f"hours.{name}")
            except CalendarError as exc:
                place, _, message = str(exc).partition(": ")
                self.problem(place, message)
        return calendars

    def parse_phrases(self, value: object) -> dict[str, Mapping[str, str]]:
        table = self.table(value, "phrases") or {}
        for code in table:
            if code not in self.languages:
                self.problem(f"phrases.{code}", f"bad language {code!r}{self.declared()}")
        phrases: dict[str, Mapping[str, str]] = {}
        for code in self.languages:
            place = f"phrases.{code}"
            given = self.table(table.get(code, {}), place) or {}
            self.known_keys(given, PLACEHOLDERS, place)
            merged = dict(BUILT_IN.get(code, {}))
            for key, text in given.items():
                if key in PLACEHOLDERS and (checked := self.phrase(text, key, place)):
                    merged[key] = checked
            for key in PLACEHOLDERS:
                if key not in merged:
                    self.problem(
                        f"{place}.{key}", f"missing prompt: no built-in {code} text, give one"
                    )
            phrases[code] = MappingProxyType(merged)
        return phrases

    def phrase(self, text: object, key: str, place: str) -> str | None:
        checked = self.string(text, f"{place}.{key}")
        if checked is None:
            return None
        try:
            used = fields_of(checked)
        except ValueError as exc:
            self.problem(f"{place}.{key}", f"bad placeholder: {exc}")
            return None
        unknown = used - PLACEHOLDERS[key]
        if unknown:
            allowed = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS[key])) or "none"
            self.problem(
                f"{place}.{key}",
                f"unknown placeholder {', '.join(sorted(unknown))} (allowed: {allowed})",
            )
            return None
        return checked

    # --- nodes --------------------------------------------------------------------------------

    def parse_nodes(self, value: object, repeats: int, timeout: int) -> dict[str, Node]:
        if value is None:
            self.problem("nodes", "missing: at least one [nodes.NAME]")
            return {}
        table = self.table(value, "nodes") or {}
        nodes: dict[str, Node] = {}
        for name, spec in table.items():
            place = f"nodes.{name}"
            if not _NAME.match(name):
                self.problem(place, "a node name is 1-64 letters, digits, _ or -")
                continue
            entry = self.table(spec, place)
            if entry is not None:
                nodes[name] = self.parse_node(name, entry, place, repeats, timeout)
        return nodes

    def parse_node(
        self, name: str, entry: Mapping[str, Any], place: str, repeats: int, timeout: int
    ) -> Node:
        has_action = "action" in entry
        if has_action:
            self.known_keys(
                entry, ("prompt", "multilingual", "action", *_action_keys(entry)), place
            )
        else:
            self.known_keys(entry, _NODE_KEYS, place)
        multilingual = entry.get("multilingual", False)
        if not isinstance(multilingual, bool):
            self.problem(f"{place}.multilingual", f"expected true or false, got {multilingual!r}")
            multilingual = False
        node_repeats = self.integer(
            entry.get("repeats", repeats), f"{place}.repeats", 0, MAX_REPEATS
        )
        node_timeout = self.integer(entry.get("timeout", timeout), f"{place}.timeout", 1, 60)
        if has_action:
            prompt = self.parse_prompt(entry.get("prompt"), f"{place}.prompt", required=False)
            # A stand-in after a problem keeps the node, so its references are not reported too.
            action = self.parse_action(entry, place) or HangUp()
            return Node(name, prompt, action=action, multilingual=multilingual)
        prompt = self.parse_prompt(entry.get("prompt"), f"{place}.prompt", required=True)
        options = self.parse_options(entry.get("options"), f"{place}.options")
        default = None
        if "default" not in entry:
            self.problem(f"{place}.default", "missing: the action after the last repeat")
        elif (table := self.table(entry["default"], f"{place}.default")) is not None:
            self.known_keys(table, ("action", *_action_keys(table)), f"{place}.default")
            default = self.parse_action(table, f"{place}.default")
        return Node(
            name,
            prompt,
            options=options,
            default=default,
            repeats=repeats if node_repeats is None else node_repeats,
            timeout=timeout if node_timeout is None else node_timeout,
            multilingual=multilingual,
        )

    def parse_prompt(self, value: object, place: str, *, required: bool) -> Mapping[str, Prompt]:
        if value is None:
            if required:
                self.problem(place, "missing prompt (a node with options says what to press)")
            return {}
        if isinstance(value, str):
            # One text for every language only makes sense when there is one language.
            if len(self.languages) == 1:
                return {next(iter(self.languages)): Prompt(text=value.strip())}
            self.problem(place, f"give one prompt per language: prompt.CODE{self.declared()}")
            return {}
        table = self.table(value, place)
        if table is None:
            return {}
        prompts: dict[str, Prompt] = {}
        for code, spec in table.items():
            if self.language(code, f"{place}.{code}") is None:
                continue
            prompt = self.parse_one_prompt(spec, f"{place}.{code}")
            if prompt is not None:
                prompts[code] = prompt
        for code in self.languages:
            if code not in table:
                self.problem(f"{place}.{code}", f"missing prompt in {code}")
        return prompts

    def parse_one_prompt(self, value: object, place: str) -> Prompt | None:
        if isinstance(value, str):
            if value.strip():
                return Prompt(text=value.strip())
            self.problem(place, "missing prompt: the text is empty")
            return None
        table = self.table(value, place)
        if table is None:
            return None
        self.known_keys(table, ("text", "audio", "voice"), place)
        text, audio = table.get("text"), table.get("audio")
        if (text is None) == (audio is None):
            self.problem(place, "missing prompt: give either text or audio (a URL)")
            return None
        voice = self.string(table["voice"], f"{place}.voice") if "voice" in table else None
        if audio is not None:
            url = self.url(audio, f"{place}.audio")
            return Prompt(audio=url) if url else None
        checked = self.string(text, f"{place}.text")
        return Prompt(text=checked, voice=voice) if checked else None

    def parse_options(self, value: object, place: str) -> tuple[Option, ...]:
        if value is None:
            self.problem(place, "missing: a menu node needs options (or an action)")
            return ()
        if not isinstance(value, list) or not value:
            self.problem(place, "expected a non-empty list of [[...options]] tables")
            return ()
        options: list[Option] = []
        digits: dict[str, int] = {}
        keywords: dict[tuple[str, str], int] = {}
        for index, spec in enumerate(value):
            option_place = f"{place}[{index}]"
            table = self.table(spec, option_place)
            if table is None:
                continue
            self.known_keys(table, (*_OPTION_KEYS, "action", *_action_keys(table)), option_place)
            digit = self.parse_digit(table.get("digit"), f"{option_place}.digit", index, digits)
            speech = self.parse_speech(
                table.get("speech"), f"{option_place}.speech", index, keywords
            )
            if digit is None and not speech and "digit" not in table:
                self.problem(option_place, "an option needs a digit or speech keywords")
            action = self.parse_action(table, option_place)
            if action is not None:
                normalised = {
                    code: tuple(normalise_speech(w) for w in words)
                    for code, words in speech.items()
                }
                options.append(
                    Option(
                        index, action, digit, MappingProxyType(speech), MappingProxyType(normalised)
                    )
                )
        return tuple(options)

    def parse_digit(
        self, value: object, place: str, index: int, seen: dict[str, int]
    ) -> str | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
            value = str(value)
        if not (isinstance(value, str) and value in DIGITS):
            self.problem(place, f"a digit is one of 0-9, * or #, got {value!r}")
            return None
        if value in seen:
            self.problem(place, f"duplicate digit {value}: already used by options[{seen[value]}]")
            return None
        seen[value] = index
        return value

    def parse_speech(
        self, value: object, place: str, index: int, seen: dict[tuple[str, str], int]
    ) -> dict[str, tuple[str, ...]]:
        if value is None:
            return {}
        table = self.table(value, place)
        speech: dict[str, tuple[str, ...]] = {}
        for code, words in (table or {}).items():
            language_place = f"{place}.{code}"
            if self.language(code, language_place) is None:
                continue
            if isinstance(words, str):
                words = [words]
            if not isinstance(words, list):
                self.problem(language_place, f"expected a list of keywords, got {_kind(words)}")
                continue
            kept: list[str] = []
            for position, word in enumerate(words):
                word_place = f"{language_place}[{position}]"
                keyword = normalise_speech(word) if isinstance(word, str) else ""
                if not keyword:
                    self.problem(word_place, f"expected a keyword, got {word!r}")
                elif (code, keyword) in seen:
                    self.problem(
                        word_place,
                        f"duplicate speech keyword {keyword!r} ({code}): already used by "
                        f"options[{seen[code, keyword]}]",
                    )
                else:
                    seen[code, keyword] = index
                    kept.append(" ".join(str(word).split()))
            speech[code] = tuple(kept)
        return speech

    # --- actions ------------------------------------------------------------------------------

    def parse_action(self, table: Mapping[str, Any], place: str) -> Action | None:
        kind = table.get("action")
        if not isinstance(kind, str) or kind not in _ACTION_KEYS:
            self.problem(
                f"{place}.action", f"unknown action {kind!r} (expected {', '.join(_ACTION_KEYS)})"
            )
            return None
        match kind:
            case "menu":
                node = self.reference(table, "node", place)
                return GoTo(node) if node else None
            case "queue" | "supervisor":
                return self.parse_enqueue(table, place, kind)
            case "callback":
                return OfferCallback(self.queue(table, place, DEFAULT_QUEUE) or DEFAULT_QUEUE)
            case "voicemail":
                return Voicemail(self.queue(table, place, DEFAULT_QUEUE) or DEFAULT_QUEUE)
            case "transfer":
                number = self.e164(table.get("number"), f"{place}.number")
                return Transfer(number) if number else None
            case "hangup":
                return HangUp()
            case "hours":
                return self.parse_hours_branch(table, place)
            case _:  # "language"
                language = self.language(table.get("language"), f"{place}.language")
                node = self.reference(table, "node", place)
                return ChooseLanguage(language, node) if language and node else None

    def parse_enqueue(self, table: Mapping[str, Any], place: str, kind: str) -> Enqueue | None:
        default = SUPERVISOR_QUEUE if kind == "supervisor" else None
        queue = self.queue(table, place, default)
        skill = self.string(table["skill"], f"{place}.skill") if "skill" in table else None
        priority = self.integer(table.get("priority", 0), f"{place}.priority", 0, MAX_PRIORITY)
        if queue is None or priority is None:
            return None
        return Enqueue(queue, skill, priority, label=kind)

    def parse_hours_branch(self, table: Mapping[str, Any], place: str) -> HoursBranch | None:
        name = self.string(table.get("hours"), f"{place}.hours")
        if name is not None and name not in self.hours_names:
            defined = ", ".join(sorted(self.hours_names)) or "none"
            self.problem(f"{place}.hours", f"unknown hours {name!r} (defined: {defined})")
        open_node = self.reference(table, "open", place)
        closed_node = self.reference(table, "closed", place)
        if name and open_node and closed_node:
            return HoursBranch(name, open_node, closed_node)
        return None

    def reference(self, table: Mapping[str, Any], key: str, place: str) -> str | None:
        name = self.string(table.get(key), f"{place}.{key}")
        if name is not None:
            self.references.append((f"{place}.{key}", name))
        return name

    def queue(self, table: Mapping[str, Any], place: str, default: str | None) -> str | None:
        if "queue" not in table and default is not None:
            name: str | None = default
        else:
            name = self.string(table.get("queue"), f"{place}.queue")
        if name is None:
            return None
        if self.known_queues is not None and name not in self.known_queues:
            known = ", ".join(sorted(self.known_queues))
            self.problem(f"{place}.queue", f"unknown queue {name!r} (known: {known})")
        return name

    def e164(self, value: object, place: str) -> str | None:
        text = value.strip() if isinstance(value, str) else None
        if text and _E164.match(text):
            try:
                number = phonenumbers.parse(text, None)
            except phonenumbers.NumberParseException:
                number = None
            if number is not None and phonenumbers.is_possible_number(number):
                formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
                if formatted == text:
                    return text
        self.problem(place, f"{value!r} is not an E.164 phone number (e.g. +4930901820)")
        return None

    # --- the graph ----------------------------------------------------------------------------

    def check_graph(self, start: str, nodes: Mapping[str, Node]) -> None:
        edges = {
            name: [t for a in node.actions() for t in targets(a) if t in nodes]
            for name, node in nodes.items()
        }
        reached = _reachable([start], edges)
        for name in nodes:
            if name not in reached:
                self.problem(
                    f"nodes.{name}", f"unreachable node: no path leads here from {start!r}"
                )
        exits = {n for n, node in nodes.items() if any(_terminal(a) for a in node.actions())}
        reverse: dict[str, list[str]] = {name: [] for name in nodes}
        for name, outgoing in edges.items():
            for target in outgoing:
                reverse[target].append(name)
        can_exit = _reachable(exits, reverse)
        for component in _cycles(edges):
            if not any(name in can_exit for name in component):
                self.problem(
                    f"nodes.{component[0]}",
                    f"loop with no way out: {_show_cycle(component)}; none of these nodes "
                    "leads to a queue, callback, voicemail, transfer or hang-up",
                )
        # What a silent caller goes through: action nodes and the defaults of menu nodes.
        silent = {
            name: [t for t in targets(node.action or node.default or HangUp()) if t in nodes]
            for name, node in nodes.items()
        }
        for component in _cycles(silent):
            self.problem(
                f"nodes.{component[0]}",
                f"loop with no way out for a caller who presses nothing: {_show_cycle(component)}"
                " (each node passes on by its action or default)",
            )


def _action_keys(table: Mapping[str, Any]) -> tuple[str, ...]:
    kind = table.get("action")
    return _ACTION_KEYS.get(kind, ()) if isinstance(kind, str) else ()


def _terminal(action: Action) -> bool:
    return isinstance(action, TERMINAL_ACTIONS)


def _reachable(starts: Iterable[str], edges: Mapping[str, Sequence[str]]) -> set[str]:
    seen = set(starts)
    todo = list(seen)
    while todo:
        for target in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _cycles(edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """The strongly connected sets that hold a cycle (Tarjan, iterative), in file order."""
    order = {name: i for i, name in enumerate(edges)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            name, i = work.pop()
            if i == 0:
                index[name] = low[name] = len(index)
                stack.append(name)
                on_stack.add(name)
            outgoing = edges[name]
            if i < len(outgoing):
                work.append((name, i + 1))
                target = outgoing[i]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[name] = min(low[name], index[target])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[name])
            if low[name] == index[name]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == name:
                        break
                if len(component) > 1 or name in edges[name]:
                    found.append(sorted(component, key=order.__getitem__))
    return sorted(found, key=lambda c: order[c[0]])


def _show_cycle(component: Sequence[str]) -> str:
    return " ↔ ".join(component) if len(component) > 1 else f"{component[0]} → {component[0]}"


def _join(place: str, key: str) -> str:
    return f"{place}.{key}" if place else key


def _kind(value: object) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "true/false"}
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return names.get(type(value), type(value).__name__)


def _choices(nodes: Mapping[str, Node]) -> str:
    names = ", ".join(sorted(nodes))
    return f" (nodes: {names})" if len(names) <= 200 else ""


def normalise_speech(text: str) -> str:
    """Lower case, accents and punctuation removed, single spaces: how keywords and what the
    caller said are compared ("Español!" and "espanol" are the same)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join("".join(c if c.isalnum() else " " for c in plain).split())
