import pytest

from core.kafka import security_options
from core.settings import Settings, SettingsError


def test_environment_overrides_file_which_overrides_defaults(tmp_path):
    config = tmp_path / "liber.toml"
    config.write_text('max_events = 7\nmax_gap_s = 60\ntopic_prefix = "x."\n')
    settings = Settings.load(config, env={"LIBER_MAX_EVENTS": "9"})
    assert settings.max_events == 9          # env wins over file
    assert settings.max_gap_s == 60.0        # file wins over default
    assert settings.topic("behaviors") == "x.behaviors"
    assert settings.max_span_s == Settings().max_span_s


@pytest.mark.parametrize("env, names", [
    ({"LIBER_MAX_EVENTS": "ten"}, "LIBER_MAX_EVENTS"),
    ({"LIBER_MAX_EVENTS": "0"}, "LIBER_MAX_EVENTS"),
    ({"LIBER_MAX_GAP_S": "-3"}, "LIBER_MAX_GAP_S"),
    ({"LIBER_BOOTSTRAP_SERVERS": "localhost"}, "LIBER_BOOTSTRAP_SERVERS"),
    ({"LIBER_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "LIBER_SASL_MECHANISM"),
    ({"LIBER_LOG_LEVEL": "LOUD"}, "LIBER_LOG_LEVEL"),
    ({"LIBER_METRICS_PORT": "70000"}, "LIBER_METRICS_PORT"),
])
def test_invalid_value_names_the_setting_in_one_line(env, names):
    with pytest.raises(SettingsError) as err:
        Settings.load(env=env)
    message = str(err.value)
    assert message.startswith(names) and "\n" not in message


def test_unknown_key_in_file_is_rejected(tmp_path):
    config = tmp_path / "liber.toml"
    config.write_text("max_evnts = 3\n")
    with pytest.raises(SettingsError, match="max_evnts"):
        Settings.load(config, env={})


def test_secrets_are_masked_and_env_round_trips():
    settings = Settings.load(env={"LIBER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                  "LIBER_SASL_MECHANISM": "PLAIN", "LIBER_SASL_USERNAME": "svc",
                                  "LIBER_SASL_PASSWORD": "hunter2"})
    assert settings.summary()["sasl_password"] == "***"
    assert security_options(settings)["sasl_plain_password"] == "hunter2"
    assert Settings.load(env=settings.to_env()) == settings


def test_replace_text_takes_values_as_the_environment_writes_them():
    s = Settings.load(env={})
    new = s.replace_text({"LIBER_LLM_DTYPE": "bfloat16", "llm_repetition_penalty": "1.15"})
    assert (new.llm_dtype, new.llm_repetition_penalty) == ("bfloat16", 1.15)
    assert s.llm_dtype == "auto"                             # a copy
    with pytest.raises(SettingsError, match="LIBER_LLM_DTYPE='int8'"):
        s.replace_text({"llm_dtype": "int8"})
    with pytest.raises(SettingsError, match="unknown setting"):
        s.replace_text({"llm_nothing": "1"})
