"""Guards the one private PEFT API vlpeft relies on: fails loudly when a PEFT release changes it."""

import peft
import peft.mapping

from vlpeft.tuners._peft_registry import PREFIXES, REQUIRED_PEFT_DICTS, VLPeftType, check_peft_internals


def test_peft_version_is_the_pinned_line():
    major, minor = (int(x) for x in peft.__version__.split(".")[:2])
    assert (major, minor) == (0, 21), f"vlpeft's registry was checked against peft 0.21, found {peft.__version__}"


def test_registry_dicts_exist():
    check_peft_internals()
    for name in REQUIRED_PEFT_DICTS:
        assert isinstance(getattr(peft.mapping, name), dict)


def test_types_are_str_enums_with_lowercase_prefixes():
    for member in VLPeftType:
        assert member == member.value  # compares equal to the JSON string
        assert PREFIXES[member] == member.value.lower() + "_"
    prefixes = list(PREFIXES.values()) + list(peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values())
    ours = set(PREFIXES.values())
    for mine in ours:
        for other in prefixes:
            if other != mine:
                assert mine not in other and other not in mine or other not in ours, (mine, other)
