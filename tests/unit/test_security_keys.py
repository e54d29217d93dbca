"""Key files, allow-lists and the serve-stage security policy (no sockets)."""

from __future__ import annotations

import pytest

from splitnet.errors import ConfigError
from splitnet.wire.security import AllowList, CurveConfig, generate_keypair, load_keypair, load_public_key, stage_socket_config

pytestmark = pytest.mark.timeout(30)


def test_keys_gen_cli_and_allow_list(tmp_path):
    from splitnet.cli import main

    assert main(["keys", "gen", "--out", str(tmp_path), "--name", "client", "--allow-dir", str(tmp_path / "allow")]) == 0
    kp = load_keypair(tmp_path / "client.key_secret")
    assert (tmp_path / "client.key_secret").stat().st_mode & 0o077 == 0
    allow = AllowList(tmp_path / "allow")
    assert kp.public in allow and len(allow) == 1
    generate_keypair(tmp_path / "allow", "late")  # picked up without a restart
    assert load_public_key(tmp_path / "allow" / "late.key") in allow
    with pytest.raises(SystemExit):
        main(["keys", "gen", "--out", str(tmp_path), "--name", "client"])  # refuses to overwrite


def test_bad_key_material_is_a_config_error(tmp_path):
    (tmp_path / "junk.key_secret").write_text("not a key")
    with pytest.raises(ConfigError):
        load_keypair(tmp_path / "junk.key_secret")
    with pytest.raises(ConfigError):
        load_keypair(tmp_path / "missing.key_secret")
    pub, _ = generate_keypair(tmp_path, "p")
    with pytest.raises(ConfigError, match="secret"):
        CurveConfig(load_keypair(pub))


def test_stage_policy(tmp_path):
    _, sec = generate_keypair(tmp_path, "server")
    assert stage_socket_config(str(sec), "", False, "tcp://0.0.0.0:5555").security is not None
    with pytest.raises(ConfigError, match="contradict"):
        stage_socket_config(str(sec), "", True, "tcp://0.0.0.0:5555")
    with pytest.raises(ConfigError, match="--insecure"):
        stage_socket_config("", "", False, "tcp://10.0.0.1:5555")
