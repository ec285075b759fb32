"""The settings are defined once (webdemo/settings.py): the docs' table and --help are made
from them, and the environment goes through the same conversions as the flags."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from webdemo import settings

ROOT = Path(__file__).resolve().parents[1]
TABLE = re.compile(r"<!-- settings table:[^\n]*-->\n(.*?)\n<!-- end of settings table -->", re.S)


def test_the_docs_table_is_the_generated_one():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    match = TABLE.search(text)
    assert match, "docs/configuration.md lost its settings table markers"
    assert match.group(1) == settings.markdown_table(), \
        "docs/configuration.md drifted: paste webdemo.settings.markdown_table() between its markers"


def test_every_setting_has_a_flag_a_variable_and_help_and_no_two_share_one():
    flags = [setting.flag for setting in settings.SETTINGS]
    variables = [setting.env for setting in settings.SETTINGS]
    assert len(set(flags)) == len(flags) and len(set(variables)) == len(variables)
    for setting in settings.SETTINGS:
        assert setting.flag.startswith("--") and setting.env.startswith("CHATGLM_") and setting.help


@pytest.mark.parametrize("setting", settings.SETTINGS, ids=lambda s: s.flag)
def test_an_unset_variable_gives_the_default_and_a_bad_one_names_itself(setting):
    assert settings.from_environment(setting, {}) == setting.default_value()
    bad = "not-a-valid-value-∞"
    if setting.kind in ("switch",) or setting.choices or setting.convert not in (str, settings.comma_list):
        with pytest.raises(Exception, match=setting.env):
            settings.from_environment(setting, {setting.env: bad})


def test_flags_beat_variables_beat_defaults():
    parser = settings.build_parser("app", "", "")
    environ = {"CHATGLM_PORT": "8000", "GRADIO_SERVER_PORT": "9999", "CHATGLM_SHARE": "yes"}
    args = settings.parse(parser, ["--port", "9000"], environ)
    assert args.port == 9000 and args.share is True and args.model == settings.DEFAULT_MODEL
    assert settings.parse(parser, [], environ).port == 8000
    assert settings.parse(parser, [], {"GRADIO_SERVER_PORT": "9999"}).port == 9999  # Gradio's own variable
    with pytest.raises(SystemExit):
        settings.parse(parser, [], {"CHATGLM_SHARE": "maybe"})
