"""Joining an existing Ray, without one: the driver says which cluster it joined, an authentication refusal is one
line saying what to set (exit 2), and a cluster named by $RAY_ADDRESS is never recorded as a local session."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from ray.exceptions import AuthenticationError

from tests.conftest import ROOT
from uda_ray.cli import main
from uda_ray.tune import driver
from uda_ray.tune.cluster import auth_message, describe_cluster, is_auth_failure, joining_address

REFUSED = "InvalidAuthToken: Authentication token is missing or incorrect"


@pytest.mark.parametrize("error, expected", [
    (AuthenticationError(REFUSED), True),
    (ConnectionError(f"GCS said {REFUSED}"), True),
    (RuntimeError("Failed to connect to GCS"), False),
    (ConnectionError("Could not find any running Ray instance"), False),
])
def test_auth_failure_is_recognised(error: BaseException, expected: bool) -> None:
    assert is_auth_failure(error) is expected
    try:
        raise RuntimeError("ray.init failed") from error
    except RuntimeError as wrapped:
        assert is_auth_failure(wrapped) is expected  # also as the cause of another error


def test_auth_message_says_what_to_set() -> None:
    text = auth_message("10.0.0.5:6379", {})
    assert "\n" not in text and "10.0.0.5:6379" in text and "RAY_AUTH_MODE is unset" in text
    assert "set RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN=<token>" in text and "ray get-auth-token" in text
    assert "RAY_AUTH_MODE is token, RAY_AUTH_TOKEN_PATH=/t" in auth_message("a", {"RAY_AUTH_MODE": "token",
                                                                                 "RAY_AUTH_TOKEN_PATH": "/t"})


def test_describe_cluster() -> None:
    nodes = [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    assert (describe_cluster("10.0.0.5:6379", nodes, {"CPU": 96.0, "GPU": 8.0}, joined=True)
            == "joined the Ray cluster at 10.0.0.5:6379: 2 nodes, 96 CPUs, 8 GPUs")
    assert (describe_cluster("127.0.0.1:1", nodes[:1], {"CPU": 2.0}, joined=False)
            == "started a local Ray at 127.0.0.1:1: 1 node, 2 CPUs, 0 GPUs")


def test_joining_address() -> None:
    assert joining_address("auto", {"RAY_ADDRESS": "x:1"}) == "auto"
    assert joining_address(None, {"RAY_ADDRESS": "x:1"}) == "x:1"
    assert joining_address(None, {}) is None


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray looks uninitialised, and nothing here may end or record local sessions."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def forbidden(*args: object) -> None:
        raise AssertionError("a driver that joins a cluster must not touch local-session records")

    monkeypatch.setattr(driver, "end_leftovers", forbidden)
    monkeypatch.setattr(driver, "record_session", forbidden)


def test_tune_against_a_cluster_that_refuses_the_token_exits_2_in_one_line(
        no_ray: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def refuse(**kwargs: object) -> None:
        raise AuthenticationError(REFUSED)

    monkeypatch.setattr(ray, "init", refuse)
    code = main(["tune", str(ROOT / "search_spaces" / "demo.yaml"), "--address", "10.0.0.5:6379",
                 "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("uda-ray: the Ray cluster at 10.0.0.5:6379 refused")
    assert "RAY_AUTH_MODE=token" in err


def fake_cluster(monkeypatch: pytest.MonkeyPatch, gcs_address: str, nodes: int,
                 resources: dict[str, float]) -> dict:
    """``ray.init`` that only records its keyword arguments (returned), and a cluster that answers as given."""
    class Context:
        pass

    Context.gcs_address = gcs_address
    asked: dict = {}
    monkeypatch.setattr(ray, "init", lambda **kw: asked.update(kw))
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    return asked


def test_joined_cluster_is_named_and_not_recorded(no_ray: None, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    asked = fake_cluster(monkeypatch, "10.0.0.5:6379", 3, {"CPU": 48.0, "GPU": 4.0})
    driver.init_ray(None)
    assert asked["address"] is None  # Ray itself reads RAY_ADDRESS
    assert "[uda-ray] joined the Ray cluster at 10.0.0.5:6379: 3 nodes, 48 CPUs, 4 GPUs" in capsys.readouterr().out


def test_no_address_starts_a_local_ray_even_beside_a_ray_start_cluster(
        no_ray: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """With no --address and no RAY_ADDRESS, Ray itself would join the newest `ray start` cluster of the machine;
    uda-ray asks for a local instance, which it then records as its own, and tells every process of the job where
    that instance's state API is (the dashboard's port, chosen free)."""
    class Node:
        @staticmethod
        def get_session_dir_path() -> str:
            return "/tmp/ray/session_x"

        @property
        def address_info(self) -> dict:
            return {"webui_url": f"127.0.0.1:{asked['dashboard_port']}"}  # the port it was asked for

    recorded = []
    monkeypatch.setattr(driver, "end_leftovers", lambda: [])
    monkeypatch.setattr(driver, "record_session", recorded.append)
    monkeypatch.setattr(ray._private.worker.global_worker, "node", Node(), raising=False)
    asked = fake_cluster(monkeypatch, "127.0.0.1:50001", 1, {"CPU": 2.0})
    driver.init_ray(None)
    assert asked["address"] == "local" and recorded == ["/tmp/ray/session_x"]
    port = asked["dashboard_port"]
    assert isinstance(port, int) and port > 0 and asked["dashboard_host"] == "127.0.0.1"
    assert asked["runtime_env"]["env_vars"] == {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
                                                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    assert "[uda-ray] started a local Ray at 127.0.0.1:50001: 1 node, 2 CPUs, 0 GPUs" in capsys.readouterr().out
