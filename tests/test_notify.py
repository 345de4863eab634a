"""Failure notifications through Prefect's flow-run state hooks, received by a real HTTP server
on 127.0.0.1 that the test starts (no mock of the client or of Prefect).

What holds by construction: the hook runs in the flow-run process after the flow's final state
is set, so the POST's body is the manifest as the run left it; a webhook that cannot be reached
is one warning and the run's exit code is the one it had without notifications.
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
from pathlib import Path

import pytest

from imgscore.config.loading import build_config
from imgscore.config.running import NotifyConfig
from imgscore.flows import notify
from imgscore.flows.cli import execute
from tests.conftest import base_overrides, make_image_folder

FIELDS = {
    "run_id",
    "status",
    "prefect_state",
    "flow_name",
    "flow_run_id",
    "message",
    "reason",
    "counts",
    "error_rate",
    "max_error_rate",
    "min_errors",
    "top_error_types",
    "input_root",
    "output_root",
    "manifest",
    "report",
    "known_bad",
    "drift",
}


class Receiver:
    """An HTTP server on 127.0.0.1 (a free port) that records every POST's path, headers and JSON body."""

    def __init__(self, status: int = 200):
        self.posts: list[dict] = []
        received = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(
                    {"path": self.path, "content_type": self.headers["Content-Type"], "body": json.loads(body)}
                )
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/imgscore"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def broken_folder(tmp_path, photos) -> Path:
    """12 photos in 3 classes and 6 broken files: 6/18 failed is over the default budget."""
    root = make_image_folder(tmp_path / "images", photos)
    (root / "zzz").mkdir()
    for i in range(6):
        (root / "zzz" / f"broken_{i}.jpg").write_bytes(b"" if i % 2 else b"not a jpeg")
    return root


@pytest.mark.slow
def test_webhook_receives_the_run_summary_when_a_night_fails(prefect_server, broken_folder, tiny_checkpoint, tmp_path):
    """Acceptance: over the error budget → flow run Failed → on_failure hook →
    one POST with the documented fields and the run's real numbers. The URL is not recorded in
    the manifest or the part files (it often holds a token)."""
    out = tmp_path / "out"
    with Receiver() as rx:
        cfg = build_config({}, base_overrides(broken_folder, tiny_checkpoint, out, **{"notify.webhook_url": rx.url}))
        code, _ = execute(cfg, quiet=True)
    assert code == 1
    (post,) = rx.posts
    assert post["path"] == "/hooks/imgscore" and post["content_type"] == "application/json"
    p = post["body"]
    assert set(p) == FIELDS
    (run_dir,) = (out / "runs").glob("*")
    assert (p["run_id"], p["status"], p["prefect_state"], p["flow_name"]) == (
        run_dir.name,
        "failed",
        "Failed",
        "score-images",
    )
    assert p["counts"] == {
        "scanned": 18,
        "scored": 12,
        "failed": 6,
        "skipped": 0,
        "already_scored": 0,
        "already_failed": 0,
        "pending": 0,
    }
    assert p["error_rate"] == round(6 / 18, 6) and (p["max_error_rate"], p["min_errors"]) == (0.01, 5)
    assert sum(e["count"] for e in p["top_error_types"]) == 6 and {e["stage"] for e in p["top_error_types"]} == {
        "decode"
    }
    assert "error rate 33.33%" in p["reason"]
    assert p["message"].startswith(
        f"run {run_dir.name} over its error budget: "
    )  # as docs/deployments.md's example: no Prefect prefix
    assert p["report"] == str(run_dir / "report.html") and Path(p["report"]).is_file()
    assert (p["manifest"], p["input_root"], p["output_root"]) == (
        str(run_dir / "manifest.json"),
        str(broken_folder),
        str(out),
    )
    assert rx.url not in (run_dir / "manifest.json").read_text()
    import pyarrow.parquet as pq

    part = next(out.glob("predictions/run_date=*/*/part-*.parquet"))
    assert rx.url.encode() not in pq.read_schema(part).metadata[b"imgscore"]


@pytest.mark.slow
def test_success_notifies_only_when_asked_and_a_dead_webhook_never_fails_the_run(
    prefect_server, image_folder, tiny_checkpoint, tmp_path, caplog
):
    """A clean run POSTs nothing by default, and once with notify.on_success (status complete).
    A webhook that refuses connections or answers 500: exit code 0 all the same, one warning."""
    out = tmp_path / "out"
    with Receiver() as rx:
        base = base_overrides(image_folder, tiny_checkpoint, out, **{"notify.webhook_url": rx.url})
        assert execute(build_config({}, base), quiet=True)[0] == 0
        assert rx.posts == []
        assert execute(build_config({}, [*base, "notify.on_success=true"]), quiet=True)[0] == 0
        (post,) = rx.posts
        assert (post["body"]["status"], post["body"]["counts"]["scored"], post["body"]["reason"]) == (
            "complete",
            12,
            None,
        )

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    with Receiver(status=500) as rx500:
        for url in (dead, rx500.url):
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                code, _ = execute(
                    build_config(
                        {},
                        [
                            *base_overrides(image_folder, tiny_checkpoint, out),
                            f"notify.webhook_url={url}",
                            "notify.on_success=true",
                            "notify.timeout_s=5",
                        ],
                    ),
                    quiet=True,
                )
            assert code == 0
            warned = [r.getMessage() for r in caplog.records if "notification not sent" in r.getMessage()]
            assert len(warned) == 1 and "the run's status stands" in warned[0]
        assert len(rx500.posts) == 1


def test_notify_config_refuses_non_http_urls_and_keeps_the_url_out_of_records():
    with pytest.raises(ValueError, match="http:// or https://"):
        NotifyConfig(webhook_url="hooks.slack.com/services/T0/B0/x")
    cfg = build_config({}, ["notify.webhook_url=https://hooks.example/T0/secret"])
    assert cfg.to_dict()["notify"]["webhook_url"] == "https://hooks.example/T0/secret"  # the flow's parameter
    assert cfg.recorded()["notify"]["webhook_url"] is None
    blocked = build_config({}, ["notify.block=slack-webhook/nightly", "notify.on_success=true"])
    assert blocked.recorded()["notify"] == NotifyConfig().model_dump(
        mode="json"
    )  # a rerun notifies only as its command says


def test_notify_settings_are_refused_at_config_time_in_one_clean_line():
    """A block that is not 'type-slug/name' is refused when the config is read (not at the run's
    end as a ValueError from unpacking), and the bad value is quoted once."""
    from imgscore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"notify.block must be 'block-type-slug/block-name'.*got 'foo'") as err:
        build_config({}, ["notify.block=foo"])
    assert str(err.value).count("'foo'") == 1
    with pytest.raises(ConfigError, match="http:// or https://") as err:
        build_config({}, ["notify.webhook_url=ftp://x"])
    assert str(err.value).count("ftp://x") == 1 and "Value error" not in str(err.value)
    assert build_config({}, ["notify.block=ms-teams-webhook/night-2"]).notify.block == "ms-teams-webhook/night-2"


def test_payload_of_a_run_that_never_planned_still_names_the_state(tmp_path):
    p = notify.run_payload(tmp_path, None, "Failed", "score-images", "f-1", "bad config")
    assert set(p) == FIELDS and (p["status"], p["message"], p["counts"]) == ("failed", "bad config", None)
    subject, body = notify.run_text(p)
    assert subject == "imgscore score-images (not planned): failed" and "why: bad config" in body


def test_a_run_refused_before_it_planned_notifies_the_webhook(image_folder, tiny_checkpoint, tmp_path, capsys):
    """Exit 2 before any flow run (no input folder, an empty one, a missing checkpoint, a
    checkpoint of another architecture): one POST each, ``status`` refused, ``run_id``, ``counts``
    and the Prefect fields null, the refusal's line in ``message`` — what the terminal printed."""
    from imgscore.flows.cli import main as cli_main

    (tmp_path / "empty").mkdir()
    cases = {
        "no input folder": {"input.root": str(tmp_path / "nowhere")},
        "empty folder": {"input.root": str(tmp_path / "empty")},
        "missing checkpoint": {"model.checkpoint": str(tmp_path / "gone.pt")},
        "another architecture": {"model.arch": "resnet18"},
    }
    with Receiver() as rx:
        for i, extra in enumerate(cases.values()):
            sets = base_overrides(
                image_folder, tiny_checkpoint, tmp_path / "out", **{"notify.webhook_url": rx.url, **extra}
            )
            capsys.readouterr()
            assert cli_main(["run", *sum((["--set", s] for s in sets), []), "--quiet"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(rx.posts) == i + 1
            p = rx.posts[-1]["body"]
            assert set(p) == FIELDS
            assert (p["status"], p["run_id"], p["counts"], p["prefect_state"], p["flow_run_id"]) == (
                "refused",
                None,
                None,
                None,
                None,
            )
            assert p["message"] and p["message"] in err and p["output_root"] == str(tmp_path / "out")
    assert not (tmp_path / "out" / "runs").exists()
