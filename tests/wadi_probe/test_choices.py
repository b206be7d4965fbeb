"""Choices print, serialise and come back through a command-line parser as their value, whatever typer does."""

from __future__ import annotations

import enum
import json

import pytest

from wadi_distill.cli.evaluate import InceptionResize
from wadi_distill.cli.export import ExportFormat
from wadi_distill.cli.extract_lora import FactorDtype, LoraFormat
from wadi_distill.cli.plan import Preset
from wadi_distill.cli.run import StudentAdapter
from wadi_distill.vsd.config import FakeKind, MixedPrecision
from wadi_probe.choices import Choice
from wadi_probe.console import Device, choice_option

EVERY_CHOICE = [Device, ExportFormat, LoraFormat, FactorDtype, Preset, InceptionResize, StudentAdapter, FakeKind,
                MixedPrecision]


@pytest.mark.parametrize("choices", EVERY_CHOICE, ids=lambda c: c.__name__)
def test_a_choice_is_its_value_in_every_form(choices: type[Choice]) -> None:
    for member in choices:
        assert str(member) == member.value
        assert f"{member}" == member.value and f"{member:>12}" == f"{member.value:>12}"
        assert json.dumps({"k": member}) == json.dumps({"k": member.value})
        assert member == member.value and hash(member) == hash(member.value)


@pytest.mark.parametrize("choices", EVERY_CHOICE, ids=lambda c: c.__name__)
def test_the_parsed_member_survives_typer_before_0_29(choices: type[Choice]) -> None:
    # typer < 0.29 runs what the option's parser returned through its enum convertor, which looks the member up
    # by str(); a member that prints as "Device.cuda" came out as None (seen: wadi-distill run on typer 0.27.2)
    option = choice_option(choices, None, "--x", what="x", help="h")
    old_typer_lookup = {str(member.value): member for member in choices}
    for member in choices:
        parsed = option.parser(member.value)
        assert parsed is member
        assert old_typer_lookup.get(str(parsed)) is member


def test_a_plain_str_enum_is_refused_as_a_choice() -> None:
    class Plain(str, enum.Enum):
        a = "a"

    assert str(Plain.a) != "a"  # what broke the lookup above
    with pytest.raises(TypeError, match="must subclass wadi_probe.choices.Choice"):
        choice_option(Plain, Plain.a, "--plain", what="plain", help="h")
