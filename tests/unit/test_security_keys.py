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


def test_secret_is_0600_from_creation_whatever_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0)
    try:
        pub, sec = generate_keypair(tmp_path, "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert load_keypair(sec).public == load_public_key(pub)


def test_existing_or_planted_files_are_never_written_through(tmp_path):
    import os

    generate_keypair(tmp_path, "k")
    with pytest.raises(ConfigError, match="exists"):
        generate_keypair(tmp_path, "k")
    before = load_keypair(tmp_path / "k.key_secret").public
    pub, _ = generate_keypair(tmp_path, "k", overwrite=True)
    assert load_public_key(pub) != before  # --force: a new pair, via a fresh file renamed over
    target = tmp_path / "elsewhere"
    target.write_text("victim file")
    os.symlink(target, tmp_path / "s.key_secret")  # an attacker's link where the secret will go
    with pytest.raises(ConfigError, match="exists"):
        generate_keypair(tmp_path, "s")
    assert target.read_text() == "victim file"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_secret_readable_by_others_is_refused(tmp_path, mode):
    import os

    _, sec = generate_keypair(tmp_path, "k")
    os.chmod(sec, mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_keypair(sec)
    os.chmod(sec, 0o600)
    assert load_keypair(sec).secret


def test_sealed_transport_is_gone_with_a_reason(tmp_path):
    from splitnet.edge.config import ClientConfig
    from splitnet.wire.security import check_transport

    _, sec = generate_keypair(tmp_path, "k")
    for make in (lambda: CurveConfig(load_keypair(sec), transport="sealed"), lambda: ClientConfig(transport="sealed"), lambda: check_transport("sealed")):
        with pytest.raises(ConfigError, match="no handshake"):
            make()
    with pytest.raises(ConfigError, match="unknown secure transport"):
        check_transport("tls")
    assert CurveConfig(load_keypair(sec)).transport == "curvezmq"


def test_server_keys_one_or_one_per_stage(tmp_path):
    from splitnet.wire.security import load_server_keys

    a, _ = generate_keypair(tmp_path, "a")
    b, _ = generate_keypair(tmp_path, "b")
    assert load_server_keys(str(a)) == (load_public_key(a),)
    assert load_server_keys(f"{a},{b}") == (load_public_key(a), load_public_key(b))
    assert load_server_keys((str(a), str(b))) == load_server_keys(f"{a}, {b}")
    with pytest.raises(ConfigError, match="no stage public key"):
        load_server_keys("")


def test_stage_keys_dir_is_trusted_and_allowed(tmp_path):
    from splitnet.wire.security import server_curve_config

    _, sec = generate_keypair(tmp_path, "stage1")
    up, _ = generate_keypair(tmp_path / "stages", "stage0")
    client, _ = generate_keypair(tmp_path / "allow", "client")
    cfg = server_curve_config(str(sec), str(tmp_path / "allow"), stage_keys_dir=str(tmp_path / "stages"))
    assert load_public_key(up) in cfg.stage_list() and load_public_key(up) in cfg.allow_list()
    assert load_public_key(client) in cfg.allow_list() and load_public_key(client) not in cfg.stage_list()
    assert cfg.public_key in cfg.stage_list()  # deployments sharing one keypair keep working
    with pytest.raises(ConfigError, match="stage-keys-dir"):
        stage_socket_config(str(sec), str(tmp_path / "allow"), False, "tcp://127.0.0.1:0", stage_keys_dir=str(tmp_path / "nope"))


def test_a_peer_dying_mid_greeting_is_no_key_verdict_but_a_repeated_hang_up_is():
    """A broken pipe while writing the greeting is a stage dying as we connect (retried, silence
    reported by timeouts); the same on the next attempt is a peer that speaks another mechanism."""
    import errno

    import zmq

    from splitnet.errors import AuthError
    from splitnet.wire.security import HandshakeWatch

    watch = HandshakeWatch(secure=False)
    ep = "tcp://127.0.0.1:9"
    watch._on_event(zmq.EVENT_CONNECTED, 0, ep)
    watch._on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE, ep)
    assert not watch.ok(ep)
    watch._on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNRESET, ep)  # resets never count
    watch._on_event(zmq.EVENT_CONNECTED, 0, ep)
    with pytest.raises(AuthError, match="requires CURVE"):
        watch._on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE, ep)
