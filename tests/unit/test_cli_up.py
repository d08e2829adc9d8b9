"""``fleet up``'s start-up abort: a Ctrl-C is reported as one, whatever step it cut short."""

from __future__ import annotations

import signal

import pytest
from click.testing import CliRunner

from producer_api.cli import up as up_module


@pytest.fixture()
def no_redis(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MODEL_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(up_module, "start_embedded_redis", lambda *a, **k: (None, "redis://127.0.0.1:1/0"))
    monkeypatch.setattr(up_module, "shutdown_redis", lambda *a, **k: None)
    from shared.settings import get_settings

    get_settings.cache_clear()  # read this test's environment
    yield
    get_settings.cache_clear()
    up_module._ABORTED.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def test_ctrl_c_landing_inside_an_import_is_still_an_abort(no_redis, monkeypatch) -> None:
    def training_cut_short(store):
        # What numpy does with a KeyboardInterrupt raised while its C extension imports.
        try:
            up_module._abort()
        except KeyboardInterrupt:
            raise ImportError("numpy.core.multiarray failed to import") from None

    monkeypatch.setattr(up_module, "_ensure_demo_models", training_cut_short)
    result = CliRunner().invoke(up_module.up, ["--flower-port", "0"])
    assert result.exit_code == 1
    assert "Stopped." in result.output and result.output.rstrip().endswith("Aborted!"), result.output
    assert "ImportError" not in result.output


def test_a_real_start_up_failure_is_not_taken_for_an_abort(no_redis, monkeypatch) -> None:
    def broken(store):
        raise ImportError("a genuinely missing module")

    monkeypatch.setattr(up_module, "_ensure_demo_models", broken)
    result = CliRunner().invoke(up_module.up, ["--flower-port", "0"])
    assert result.exit_code == 1 and isinstance(result.exception, ImportError)
