"""W&B online mode without a reachable server or an API key: the run falls back to an
offline run within seconds, says so, and loses nothing. Only 127.0.0.1 is ever contacted."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from omegaconf import OmegaConf

import metaloss.cli.logger as lg
from metaloss.cli.logger import open_logger
from metaloss.wandb_offline import read_run

DUMMY_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, like a real key


def dead_url() -> str:
    """A local port nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def no_stored_credentials(monkeypatch, tmp_path):
    for var in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_MODE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def config(**logger):
    return OmegaConf.create(
        {
            "seed": 0,
            "logger": {
                "kind": "wandb",
                "mode": "online",
                "project": "fallback-test",
                "tags": ["t"],
                **logger,
            },
        }
    )


def log_and_read(cfg, out_dir, caplog) -> tuple[dict, float]:
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="metaloss"):
        with open_logger(cfg, out_dir, job_type="test", name="fallback") as logger:
            ready = time.monotonic() - start
            for step in range(3):
                logger.log({"train/loss": 1.0 / (step + 1)}, step=step)
            logger.summary({"test/acc": 0.75})
    return read_run(out_dir / "wandb"), ready


def assert_everything_logged(run: dict) -> None:
    assert run["finished"]
    assert [row["train/loss"] for row in run["history"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert run["summary"]["test/acc"] == 0.75
    assert run["config"]["logger"]["mode"] == "online"  # the config as asked for


def test_unreachable_server_falls_back_to_offline(
    tmp_path, monkeypatch, caplog, no_stored_credentials
):
    monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", dead_url())
    run, ready = log_and_read(config(), tmp_path, caplog)
    assert ready < 30
    assert (
        "logging this run offline" in caplog.text and "cannot connect to 127.0.0.1" in caplog.text
    )
    assert_everything_logged(run)


def test_base_url_from_the_logger_config_is_probed(
    tmp_path, monkeypatch, caplog, no_stored_credentials
):
    monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    url = dead_url()
    run, ready = log_and_read(config(base_url=url), tmp_path, caplog)
    assert ready < 30 and url.split("//")[1] in caplog.text
    assert_everything_logged(run)


def test_missing_api_key_falls_back_without_prompting(
    tmp_path, monkeypatch, caplog, no_stored_credentials
):
    monkeypatch.setenv("WANDB_BASE_URL", dead_url())
    run, ready = log_and_read(config(), tmp_path, caplog)
    assert ready < 30 and "no W&B API key" in caplog.text
    assert_everything_logged(run)


def test_server_that_never_answers_times_out_into_offline(
    tmp_path, monkeypatch, caplog, no_stored_credentials
):
    """TCP connects (the probe passes) but no HTTP answer: wandb.init's own timeout fires."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel accepts connections; nobody ever reads or replies
        monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        run, ready = log_and_read(config(init_timeout=2), tmp_path, caplog)
    assert ready < 30 and "wandb.init failed" in caplog.text
    assert_everything_logged(run)


def test_offline_mode_never_probes_or_warns(tmp_path, monkeypatch, caplog):
    def no_probe(*_a, **_k):
        raise AssertionError("offline mode must not touch the network")

    monkeypatch.setattr(lg, "_why_not_online", no_probe)
    run, _ = log_and_read(config(mode="offline"), tmp_path, caplog)
    assert "offline instead" not in caplog.text
    assert run["finished"] and run["summary"]["test/acc"] == 0.75


@pytest.mark.parametrize("mode", ["online", "offline"])
@pytest.mark.parametrize("bad", [0, -1, "soon"])
def test_init_timeout_must_be_positive(tmp_path, bad, mode):
    with pytest.raises(ValueError, match="init_timeout"):
        with open_logger(config(init_timeout=bad, mode=mode), tmp_path, job_type="test"):
            pass


def test_probe_goes_to_the_proxy_when_one_applies(monkeypatch, no_stored_credentials):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert lg._connect_target("https://api.wandb.ai") == ("127.0.0.1", 3128)
    assert lg._connect_target("https://internal.example") == ("internal.example", 443)
    assert lg._connect_target("http://127.0.0.1:8080") == ("127.0.0.1", 8080)  # no http proxy set


def test_probe_gives_up_on_a_hanging_connect(monkeypatch):
    """Name resolution ignores socket timeouts; the probe must not wait on it."""

    def hang(*_a, **_k):
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(lg.socket, "create_connection", hang)
    start = time.monotonic()
    reason = lg._unreachable("http://127.0.0.1:9", timeout=0.3)
    assert time.monotonic() - start < 2 and "no answer from 127.0.0.1:9 within 0.3 s" in reason
