"""The IVR menu file: the model it parses to and one test per kind of problem the checker names,
each with its place."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ivr.menu import (
    BUNDLED_EXAMPLE,
    ChooseLanguage,
    Enqueue,
    GoTo,
    HangUp,
    HoursBranch,
    OfferCallback,
    Problem,
    Transfer,
    Voicemail,
    check_menu,
    normalise_speech,
    parse_menu,
)

BASE = tomllib.loads(
    """
[menu]
start = "welcome"

[languages.en]
locale = "en-US"
voice = "Polly.Joanna"

[languages.de]
locale = "de-DE"

[hours.office]
timezone = "Europe/Berlin"
mon = ["09:00-17:00"]

[nodes.welcome]
prompt.en = "Hello"
prompt.de = "Hallo"
action = "hours"
hours = "office"
open = "main"
closed = "closed"

[nodes.closed]
action = "voicemail"

[nodes.main]
prompt.en = "For billing press 1, for more press 2."
prompt.de = { text = "Rechnung 1, mehr 2.", voice = "Polly.Vicki" }
default = { action = "hangup" }

[[nodes.main.options]]
digit = "1"
speech.en = ["billing", "invoice"]
speech.de = ["rechnung"]
action = "queue"
queue = "billing"
skill = "billing"
priority = 2

[[nodes.main.options]]
digit = "2"
speech.en = ["more"]
action = "menu"
node = "more"

[nodes.more]
prompt.en = { audio = "https://example.com/more-en.mp3" }
prompt.de = { audio = "https://example.com/more-de.mp3" }
default = { action = "menu", node = "main" }

[[nodes.more.options]]
digit = "1"
action = "transfer"
number = "+4930901820"

[[nodes.more.options]]
digit = "2"
action = "callback"

[[nodes.more.options]]
digit = "3"
action = "supervisor"

[[nodes.more.options]]
speech.de = ["englisch"]
action = "language"
language = "en"
node = "main"
"""
)


def menu_data() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def places(problems: list[Problem]) -> list[str]:
    return [p.place for p in problems]


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------- the model


def test_a_valid_menu_parses_to_its_model() -> None:
    menu, problems = parse_menu(menu_data())
    assert problems == []
    assert menu is not None
    assert menu.start == "welcome"
    assert menu.default_language == "en"
    assert menu.languages["en"].voice == "Polly.Joanna"
    assert menu.nodes["welcome"].action == HoursBranch("office", "main", "closed")
    assert menu.nodes["closed"].action == Voicemail("default")
    main = menu.nodes["main"]
    assert main.repeats == 2
    assert main.timeout == 5
    assert main.default == HangUp()
    assert main.prompt["de"].voice == "Polly.Vicki"
    assert main.options[0].action == Enqueue("billing", "billing", 2, label="queue")
    assert main.options[0].keywords["en"] == ("billing", "invoice")
    assert main.options[1].action == GoTo("more")
    more = menu.nodes["more"]
    assert more.prompt["en"].audio == "https://example.com/more-en.mp3"
    assert [o.action for o in more.options] == [
        Transfer("+4930901820"),
        OfferCallback("default"),
        Enqueue("supervisors", None, 0, label="supervisor"),
        ChooseLanguage("en", "main"),
    ]
    assert more.options[3].token == "o3"
    assert menu.phrase("de", "position", position=3).startswith("Sie sind an Position 3")


def test_the_bundled_example_is_valid_even_with_its_queues_checked() -> None:
    data = tomllib.loads(BUNDLED_EXAMPLE.read_text(encoding="utf-8"))
    assert check_menu(data) == []
    assert check_menu(data, {"billing", "tech", "supervisors"}) == []
    menu, _ = parse_menu(data)
    assert menu is not None
    assert list(menu.languages) == ["en", "de", "es"]
    supervisor = next(o for o in menu.nodes["main"].options if o.digit == "5")
    assert supervisor.action == Enqueue("supervisors", None, 0, label="supervisor")


# --------------------------------------------------------------------------- one test per kind


def test_unknown_node() -> None:
    data = menu_data()
    data["nodes"]["main"]["options"][1]["node"] = "mroe"
    problem = only([p for p in check_menu(data) if "unknown node" in p.message])
    assert problem.place == "nodes.main.options[1].node"
    assert "'mroe'" in problem.message


def test_unknown_start_node() -> None:
    data = menu_data()
    data["menu"]["start"] = "hello"
    assert "menu.start" in places(check_menu(data))


def test_unknown_queue_when_the_queues_are_known() -> None:
    data = menu_data()
    given_queues = {"billing"}
    problems = check_menu(data, given_queues)
    assert only(problems).place == "nodes.more.options[2].queue"  # "supervisors"
    assert "unknown queue 'supervisors'" in only(problems).message
    assert check_menu(data, {"billing", "supervisors"}) == []  # "default" always exists
    assert check_menu(data, None) == []  # not checked


def test_duplicate_digit() -> None:
    data = menu_data()
    data["nodes"]["more"]["options"][2]["digit"] = "1"
    problem = only(check_menu(data))
    assert problem.place == "nodes.more.options[2].digit"
    assert problem.message == "duplicate digit 1: already used by options[0]"


def test_bad_digit() -> None:
    data = menu_data()
    data["nodes"]["more"]["options"][2]["digit"] = "12"
    assert only(check_menu(data)).place == "nodes.more.options[2].digit"


def test_duplicate_speech_keyword_after_normalising() -> None:
    data = menu_data()
    data["nodes"]["main"]["options"][1]["speech"]["en"] = ["more", "Billing!"]
    problem = only(check_menu(data))
    assert problem.place == "nodes.main.options[1].speech.en[1]"
    assert "duplicate speech keyword 'billing' (en)" in problem.message


def test_the_same_keyword_in_two_languages_is_no_duplicate() -> None:
    data = menu_data()
    data["nodes"]["main"]["options"][1]["speech"]["de"] = ["billing"]
    assert check_menu(data) == []


def test_unreachable_node() -> None:
    data = menu_data()
    data["nodes"]["orphan"] = {"action": "hangup"}
    problem = only(check_menu(data))
    assert problem.place == "nodes.orphan"
    assert "unreachable" in problem.message


def test_loop_with_no_way_out() -> None:
    data = menu_data()
    data["nodes"]["main"]["options"].append({"digit": "3", "action": "menu", "node": "a"})
    data["nodes"]["a"] = {
        "prompt": {"en": "a", "de": "a"},
        "options": [{"digit": "1", "action": "menu", "node": "b"}],
        "default": {"action": "menu", "node": "b"},
    }
    data["nodes"]["b"] = {
        "prompt": {"en": "b", "de": "b"},
        "options": [{"digit": "1", "action": "menu", "node": "a"}],
        "default": {"action": "menu", "node": "a"},
    }
    problems = check_menu(data)
    loops = [p for p in problems if p.message.startswith("loop with no way out:")]
    assert places(loops) == ["nodes.a"]
    assert "a ↔ b" in loops[0].message


def test_a_loop_with_an_exit_is_fine() -> None:
    data = menu_data()
    data["nodes"]["more"]["options"].append({"digit": "9", "action": "menu", "node": "more"})
    assert check_menu(data) == []


def test_loop_for_a_caller_who_presses_nothing() -> None:
    data = menu_data()
    data["nodes"]["main"]["default"] = {"action": "menu", "node": "more"}
    problem = only(check_menu(data))  # more's default goes back to main
    assert problem.place == "nodes.main"
    assert "presses nothing" in problem.message


def test_missing_prompt_in_a_declared_language() -> None:
    data = menu_data()
    del data["nodes"]["main"]["prompt"]["de"]
    problem = only(check_menu(data))
    assert problem.place == "nodes.main.prompt.de"
    assert problem.message == "missing prompt in de"


def test_missing_prompt_of_a_menu_node() -> None:
    data = menu_data()
    del data["nodes"]["main"]["prompt"]
    problem = only(check_menu(data))
    assert problem.place == "nodes.main.prompt"
    assert problem.message.startswith("missing prompt")


def test_empty_prompt_and_prompt_with_both_text_and_audio() -> None:
    data = menu_data()
    data["nodes"]["main"]["prompt"]["en"] = "  "
    data["nodes"]["more"]["prompt"]["de"] = {"text": "x", "audio": "https://e.com/a.mp3"}
    assert places(check_menu(data)) == ["nodes.main.prompt.en", "nodes.more.prompt.de"]


def test_missing_phrase_for_a_language_without_built_in_texts() -> None:
    data = menu_data()
    data["languages"]["fr"] = {"locale": "fr-FR"}
    data["phrases"] = {"fr": {"goodbye": "Au revoir."}}
    for node in ("welcome", "main", "more"):
        data["nodes"][node]["prompt"]["fr"] = "Bonjour"
    problems = check_menu(data)
    assert "phrases.fr.position" in places(problems)
    assert "phrases.fr.goodbye" not in places(problems)
    assert all(p.message.startswith("missing prompt") for p in problems)


def test_phrase_with_an_unknown_placeholder() -> None:
    data = menu_data()
    data["phrases"] = {"en": {"position": "You are {place} in line."}}
    problem = only(check_menu(data))
    assert problem.place == "phrases.en.position"
    assert "{position}" in problem.message


def test_bad_repeats() -> None:
    data = menu_data()
    data["menu"]["repeats"] = -1
    data["nodes"]["main"]["repeats"] = "3"
    data["nodes"]["more"]["repeats"] = 99
    assert places(check_menu(data)) == [
        "menu.repeats",
        "nodes.main.repeats",
        "nodes.more.repeats",
    ]


def test_bad_language() -> None:
    data = menu_data()
    data["languages"]["english"] = {"locale": "en-GB"}
    data["languages"]["de"]["locale"] = "german"
    data["nodes"]["more"]["options"][3]["language"] = "fr"
    data["nodes"]["main"]["prompt"]["es"] = "Hola"
    problems = check_menu(data)
    assert places(problems) == [
        "languages.de.locale",
        "languages.english",
        "nodes.main.prompt.es",
        "nodes.more.options[3].language",
    ]
    assert all("bad language" in p.message for p in problems)


def test_bad_default_language() -> None:
    data = menu_data()
    data["menu"]["default_language"] = "fr"
    assert only(check_menu(data)).place == "menu.default_language"


def test_transfer_number_must_be_e164() -> None:
    for number in ("030 901820", "+49 30 901820", "+1", "4930901820", "+999123456789"):
        data = menu_data()
        data["nodes"]["more"]["options"][0]["number"] = number
        problem = only(check_menu(data))
        assert problem.place == "nodes.more.options[0].number", number
        assert "E.164" in problem.message


def test_business_hours_problems_keep_their_place() -> None:
    data = menu_data()
    data["hours"]["office"]["mon"] = ["17:00-09:00"]
    data["hours"]["office"]["timezone"] = "Europe/Berlin"
    problem = only(check_menu(data))
    assert problem.place == "hours.office.mon[0]"
    assert "not after start" in problem.message


def test_unknown_hours_calendar() -> None:
    data = menu_data()
    data["nodes"]["welcome"]["hours"] = "ofice"
    problem = only(check_menu(data))
    assert problem.place == "nodes.welcome.hours"
    assert "unknown hours 'ofice'" in problem.message


def test_unknown_keys_and_actions() -> None:
    data = menu_data()
    data["nodes"]["main"]["options"][0]["skil"] = "billing"
    data["nodes"]["more"]["default"] = {"action": "jump", "node": "main"}
    data["extra"] = 1
    assert places(check_menu(data)) == [
        "extra",
        "nodes.main.options[0].skil",
        "nodes.more.default.node",
        "nodes.more.default.action",
    ]


def test_missing_default_of_a_menu_node() -> None:
    data = menu_data()
    del data["nodes"]["main"]["default"]
    assert only(check_menu(data)).place == "nodes.main.default"


def test_an_option_needs_a_digit_or_keywords() -> None:
    data = menu_data()
    del data["nodes"]["more"]["options"][3]["speech"]
    assert only(check_menu(data)).place == "nodes.more.options[3]"


def test_every_problem_is_reported_not_only_the_first() -> None:
    data = menu_data()
    data["nodes"]["main"]["options"][1]["digit"] = "1"
    data["nodes"]["main"]["options"][0]["queue"] = ""
    del data["nodes"]["more"]["prompt"]["de"]
    assert places(check_menu(data)) == [
        "nodes.main.options[0].queue",
        "nodes.main.options[1].digit",
        "nodes.more.prompt.de",
    ]


def test_speech_is_compared_without_case_accents_or_punctuation() -> None:
    assert normalise_speech("  Español, por favor!") == "espanol por favor"
    assert normalise_speech("Störung") == "storung"


# --------------------------------------------------------------------------- for all inputs

_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.text(max_size=8), st.sampled_from(["main"])
)
_values = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                ["prompt", "options", "default", "action", "node", "digit", "en", "de", "queue"]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    path=st.lists(
        st.sampled_from(["menu", "languages", "hours", "nodes", "main", "en", "options", "0"]),
        min_size=1,
        max_size=4,
    ),
    value=_values,
)
def test_any_damage_gives_problems_with_places_or_a_menu_never_an_exception(
    path: list[str], value: object
) -> None:
    data: Any = menu_data()
    target = data
    for key in path[:-1]:
        if isinstance(target, dict) and isinstance(target.get(key), dict | list):
            target = target[key]
        elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
            target = target[int(key)]
    if isinstance(target, dict):
        target[path[-1]] = value
    menu, problems = parse_menu(data)
    assert (menu is None) == bool(problems)
    assert all(p.place and p.message for p in problems)
