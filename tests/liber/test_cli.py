import subprocess
import sys


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "liber.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_invalid_setting_stops_with_one_clear_line():
    import os
    result = run("config", env={**os.environ, "LIBER_MAX_EVENTS": "many"})
    assert result.returncode == 2
    assert result.stderr.strip() == "liber: invalid setting: LIBER_MAX_EVENTS='many': must be an integer"


def test_config_prints_settings_with_secret_masked():
    import json
    import os
    result = run("config", env={**os.environ, "LIBER_SASL_PASSWORD": "s3cret"})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["sasl_password"] == "***" and "s3cret" not in result.stdout


def test_eval_dare_refuses_a_bad_reference_setting_before_any_work():
    result = run("eval-dare", "--reference", "llm_dtype=int8")
    assert result.returncode == 2
    assert result.stderr.strip() == ("liber: invalid setting: LIBER_LLM_DTYPE='int8': must be "
                                     "auto, float32, bfloat16 or float16")
