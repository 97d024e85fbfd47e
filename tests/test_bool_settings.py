"""OMNIZIP_* booleans read one way by the engine's settings, the front door's and the CLI's:
the same words accepted, anything else refused naming the variable (before, the engine took
"on" and the front door did not, and a typo such as "ture" silently meant false)."""

from __future__ import annotations

import pytest

from pipeline.api.gate import gate_settings
from pipeline.core.config import ServiceConfig, parse_bool


@pytest.mark.parametrize("word, value", [("1", True), ("true", True), ("Yes", True), (" on ", True),
                                         ("0", False), ("false", False), ("NO", False), ("off", False), ("", False)])
def test_the_same_words_everywhere(word: str, value: bool) -> None:
    assert parse_bool(word, "X") is value
    assert ServiceConfig.from_env({"OMNIZIP_TLS_VERIFY": word}).tls_verify is value
    assert gate_settings(environ={"OMNIZIP_INSECURE": word}).insecure is value


@pytest.mark.parametrize("word", ["ture", "2", "enabled", "yes!"])
def test_anything_else_is_refused_naming_the_variable(word: str) -> None:
    with pytest.raises(ValueError, match="OMNIZIP_TLS_VERIFY"):
        ServiceConfig.from_env({"OMNIZIP_TLS_VERIFY": word})
    with pytest.raises(ValueError, match="OMNIZIP_INSECURE"):
        gate_settings(environ={"OMNIZIP_INSECURE": word})
