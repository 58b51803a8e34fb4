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


def test_types_are_str_enums_with_distinct_prefixes():
    for member in VLPeftType:
        assert member == member.value  # compares equal to the JSON string
        assert PREFIXES[member] == member.value.lower() + "_"
    ours = list(PREFIXES.values())
    for mine in ours:
        # PEFT selects a method's parameters by "prefix in name": no vlpeft prefix may contain another one.
        assert all(other == mine or other not in mine for other in ours), mine
    theirs = {prefix for key, prefix in peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if key not in PREFIXES}
    assert not theirs & set(ours)


def test_import_registers_every_method():
    import vlpeft  # noqa: F401

    for member, prefix in PREFIXES.items():
        assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[member] == prefix
        assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[member].prefix == prefix
        assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[member]().peft_type == member
