"""The supervisor's hang probe on keyed stages and ``splitnet serve --hang-timeout-s``: ``info`` is
asked over CURVE as the stage's own keypair (a stage allows it), a wrong key gets no answer, a
command the supervisor cannot ask is left alone, and serve hands its hang timeout to the
supervisor (a bad one is refused before anything starts). Real sockets on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq

from splitnet.cloud import supervisor
from splitnet.cloud.supervisor import info_probe
from splitnet.wire import Message, SocketConfig, make_socket
from splitnet.wire.security import CurveConfig, generate_keypair, load_keypair
from fake_stage import FakeStage

pytestmark = pytest.mark.timeout(60)


def CurveStage(secret: str, allow_dir: str) -> FakeStage:  # noqa: N802 - reads as the stage it stands for
    """A CURVE ROUTER (the stage's keypair, allow-list directory empty) answering ``info``."""
    sock = make_socket(zmq.Context.instance(), zmq.ROUTER, SocketConfig(security=CurveConfig(keypair=load_keypair(secret), allow_dir=allow_dir)), server=True)

    def answer(msg: Message) -> Message | None:
        if msg.kind == "info":
            return Message(kind="info_reply", req=msg.req, meta={"stats": {"forwards": 7}, "queue_depth": 0, "pid": 1})
        return None

    return FakeStage(answer, sock)


@pytest.fixture
def keyed(tmp_path):
    _, stage_secret = generate_keypair(tmp_path, "stage")
    _, other_secret = generate_keypair(tmp_path, "other")
    allow = tmp_path / "clients"
    allow.mkdir()
    stage = CurveStage(str(stage_secret), str(allow))
    yield stage, str(stage_secret), str(other_secret)
    stage.close()


def _cmd(bind: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "splitnet.runtime.cli_serve", "--model", "tiny-gpt2", "--blocks", "0:1", "--bind", bind, *extra]


def test_a_keyed_stage_is_asked_as_its_own_keypair(keyed):
    stage, secret, _ = keyed
    info = info_probe(_cmd(stage.endpoint, "--server-key", secret), timeout_s=5)
    assert info is not None and info["stats"]["forwards"] == 7


def test_the_key_may_come_from_the_environment(keyed, monkeypatch):
    stage, secret, _ = keyed
    monkeypatch.setenv("SPLITNET_SERVER_KEY", secret)
    assert info_probe(_cmd(stage.endpoint), timeout_s=5)["queue_depth"] == 0


def test_another_key_gets_no_answer(keyed):
    stage, _, other = keyed
    assert info_probe(_cmd(stage.endpoint, "--server-key", other), timeout_s=1.5) is None


def test_a_command_it_cannot_ask_is_left_alone(monkeypatch):
    monkeypatch.delenv("SPLITNET_SERVER_KEY", raising=False)
    assert info_probe(_cmd("tcp://127.0.0.1:1"), timeout_s=0.5) == {}  # neither --insecure nor a key
    assert info_probe([sys.executable, "-c", "pass"], timeout_s=0.5) == {}  # not a stage


def test_serve_hands_its_hang_timeout_to_the_supervisor(monkeypatch, tmp_path):
    from splitnet.cli import build_parser
    from splitnet.cloud import server

    seen = {}

    class FakeSupervisor:
        def __init__(self, cmds, policy=None, hang=None, **_):
            seen["hang"] = hang
            self.children = []

        def start(self):
            pass

        def poll(self):
            return False

        def stop(self):
            pass

    monkeypatch.setattr(supervisor, "Supervisor", FakeSupervisor)
    monkeypatch.setattr(server, "export_edge_stages", lambda *a, **k: None)
    monkeypatch.setattr(server, "stage_commands", lambda *a, **k: {"stage 0": _cmd("tcp://127.0.0.1:1", "--insecure")})
    args = build_parser().parse_args(["serve", "--plan", str(tmp_path / "p.yaml"), "--device", "cloud", "--hang-timeout-s", "7.5"])
    server.run(args)
    assert seen["hang"].hang_timeout_s == 7.5


def test_serve_refuses_a_hang_timeout_that_is_not_positive(tmp_path):
    r = subprocess.run([sys.executable, "-m", "splitnet.cli", "serve", "--plan", str(tmp_path / "p.yaml"), "--device", "cloud",
                        "--hang-timeout-s", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "HangPolicy needs positive" in r.stderr, r.stderr
