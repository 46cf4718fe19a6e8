"""Configuration layers: defaults < file < environment < command line; secrets kept out of the repository."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bridge.config import ConfigError, ensure_secrets, load_config

pytestmark = pytest.mark.unit


def test_each_layer_overrides_the_one_before(tmp_path: Path) -> None:
    file = tmp_path / "ivr-bridge.yaml"
    file.write_text("asterisk:\n  ami_port: 6000\n  sip_port: 6060\nredis:\n  url: redis://file\n"
                    f"general:\n  var_dir: {tmp_path}\n")
    env = {"IVR_BRIDGE__ASTERISK__SIP_PORT": "7060", "IVR_BRIDGE__TTS__VOICES": "{en: gmw/en-gb}"}
    config = load_config(file, env=env, overrides=["redis.url=redis://cli"])
    assert config.asterisk.ami_port == 6000          # file over default
    assert config.asterisk.sip_port == 7060          # env over file
    assert config.redis.url == "redis://cli"         # CLI over file
    assert config.tts.voices == {"en": "gmw/en-gb"}  # env values are YAML
    assert config.asterisk.heartbeat_interval == 3.0  # default kept


def test_database_defaults_to_sqlite_under_var_dir(tmp_path: Path) -> None:
    config = load_config(None, env={"IVR_BRIDGE__GENERAL__VAR_DIR": str(tmp_path)})
    assert config.database_url == f"sqlite+aiosqlite:///{tmp_path}/ivr-bridge.db"


@pytest.mark.parametrize(("env", "overrides", "message"), [
    ({"IVR_BRIDGE__ASTERISK__AMI_PORT": "many"}, [], "asterisk.ami_port"),
    ({"IVR_BRIDGE__ASTERISK__NO_SUCH": "1"}, [], "asterisk.no_such"),
    ({}, ["redis"], "expected section.key=value"),
    ({}, ["nosection=1"], "must be section.key"),
])
def test_bad_settings_name_the_setting(env: dict[str, str], overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, env=env, overrides=overrides)


def test_broken_config_file_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("asterisk: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(file, env={})


def test_secrets_are_generated_once_private_and_kept(tmp_path: Path) -> None:
    env = {"IVR_BRIDGE__GENERAL__VAR_DIR": str(tmp_path)}
    config = load_config(None, env=env)
    assert config.asterisk.ami_secret == ""
    ensure_secrets(config)
    secrets_file = tmp_path / "secrets.yaml"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    first = config.asterisk.ami_secret
    assert len(first) >= 24
    again = load_config(None, env=env)
    ensure_secrets(again)
    assert again.asterisk.ami_secret == first
    from_env = load_config(None, env={**env, "IVR_BRIDGE__ASTERISK__AMI_SECRET": "fromenv"})
    assert from_env.asterisk.ami_secret == "fromenv"  # the environment wins over the file
