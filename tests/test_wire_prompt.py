"""Login prompt and answer lines (wire.py): shapes, validation, and that no error message
repeats a response (they are secrets)."""

from __future__ import annotations

import pytest

from tunneld import wire
from tunneld.errors import ProtocolError

SECRET = "s3cret-Answer"


def _line(msg):
    return wire.decode(wire.encode(msg))


def test_prompt_round_trip():
    msg = _line(wire.prompt(3, "barhal", "kbdint", [("Password: ", False), ("Code: ", True)],
                            name="Duo", instructions="Enter both", attempt=2))
    assert wire.is_prompt(msg) and not wire.is_final(msg)
    p = wire.parse_prompt(msg)
    assert p == {"id": 3, "kind": "kbdint", "host": "barhal", "name": "Duo",
                 "instructions": "Enter both", "attempt": 2,
                 "prompts": [("Password: ", False), ("Code: ", True)]}


def test_prompt_defaults_and_no_prompts():
    p = wire.parse_prompt(_line(wire.prompt(1, "h", "password", [])))
    assert p["prompts"] == [] and p["attempt"] == 1 and p["name"] == ""


@pytest.mark.parametrize("prompt, fragment", [
    ([], "JSON object"),
    ({"id": "1", "kind": "password", "prompts": []}, "integer 'id'"),
    ({"id": True, "kind": "password", "prompts": []}, "integer 'id'"),
    ({"id": 1, "kind": "pin", "prompts": []}, "unknown prompt kind"),
    ({"id": 1, "kind": "kbdint", "prompts": "Password:"}, "list of at most"),
    ({"id": 1, "kind": "kbdint", "prompts": [{"text": "x"}] * (wire.MAX_PROMPTS + 1)},
     "list of at most"),
    ({"id": 1, "kind": "kbdint", "prompts": [{"text": "x", "echo": "no"}]}, "echo"),
    ({"id": 1, "kind": "kbdint", "prompts": [{"text": 5, "echo": False}]}, "must be a string"),
    ({"id": 1, "kind": "kbdint", "prompts": [{"text": "x" * (wire.MAX_PROMPT_TEXT + 1),
                                              "echo": False}]}, "longer than"),
    ({"id": 1, "kind": "kbdint", "prompts": [], "host": ["h"]}, "must be a string"),
])
def test_parse_prompt_rejects(prompt, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        wire.parse_prompt({"prompt": prompt})


def test_answer_and_cancel():
    assert wire.parse_answer(_line(wire.answer(4, [SECRET, "x"])), 4, 2) == [SECRET, "x"]
    assert wire.parse_answer(_line(wire.cancel(4)), 4, 2) is None
    assert wire.parse_answer(_line(wire.answer(4, [])), 4, 0) == []


@pytest.mark.parametrize("msg, fragment", [
    ({"cmd": "list"}, "expected an answer"),
    ({"answer": [SECRET]}, "expected an answer"),
    ({"answer": {"id": 5, "responses": [SECRET]}}, "not for prompt 4"),
    ({"answer": {"id": True, "responses": [SECRET]}}, "not for prompt"),
    ({"answer": {"id": 4, "responses": [SECRET, SECRET]}}, "list of 1 response"),
    ({"answer": {"id": 4, "responses": SECRET}}, "list of 1 response"),
    ({"answer": {"id": 4, "responses": [7]}}, "must be a string"),
    ({"answer": {"id": 4, "responses": [SECRET * 1000]}}, "longer than"),
    ({"answer": {"id": 4, "responses": ["\ud800" + SECRET]}}, "lone surrogate"),
    ({"answer": {"id": 4, "cancel": "yes", "responses": None}}, "list of 1 response"),
])
def test_parse_answer_rejects_without_repeating_the_answer(msg, fragment):
    with pytest.raises(ProtocolError, match=fragment) as info:
        wire.parse_answer(msg, 4, 1)
    assert SECRET not in str(info.value)


def test_login_is_a_command():
    assert "login" in wire.COMMANDS
    assert wire.parse_request(wire.request("login", host="barhal", interactive=True)) == \
        ("login", {"host": "barhal", "interactive": True})
