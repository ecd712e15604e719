"""``pipeline submit`` and ``pipeline lb --fetch`` against a loopback server standing in for Kaggle's API at its
HTTP boundary: the requests the official package sends, the reply recorded beside the file, and one line (exit
2, nothing changed) for each way it fails."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cli_error, run_cli

pytest.importorskip("kaggle.api.kaggle_api_extended")

SERVICE = "/v1/competitions.CompetitionApiService/"


class FakeKaggle(BaseHTTPRequestHandler):
    """Kaggle's competition API as the package calls it: start an upload, PUT the file, create the
    submission, list the submissions. ``server.fail`` answers every call with that HTTP status."""

    def _reply(self, code: int, body: dict | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        self.server.calls.append(("POST", self.path, body, self.headers.get("Authorization")))
        if self.server.fail and SERVICE in self.path:
            return self._reply(self.server.fail, {"code": self.server.fail, "message": "nope"})
        port = self.server.server_address[1]
        if self.path == "/v1/security.OAuthService/IntrospectToken":  # the package checks the token first
            ok = body.get("token") == "test-token"
            return self._reply(200, {"active": ok, "username": "tester" if ok else ""})
        if self.path == SERVICE + "StartSubmissionUpload":
            return self._reply(200, {"token": "blob-1", "createUrl": f"http://127.0.0.1:{port}/upload/blob-1"})
        if self.path == SERVICE + "CreateSubmission":
            return self._reply(200, {"message": "Successfully submitted to Test Comp", "ref": 4242})
        if self.path == SERVICE + "ListSubmissions":
            return self._reply(200, {"submissions": self.server.listed})
        return self._reply(404)

    def do_PUT(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.server.uploads[self.path] = self.rfile.read(n)
        self.server.calls.append(("PUT", self.path, None, None))
        return self._reply(200)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def kaggle_server(monkeypatch, tmp_path):
    from kagglesdk import kaggle_env

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKaggle)
    server.calls, server.uploads, server.fail = [], {}, 0
    server.listed = [{"ref": 4242, "publicScore": "0.18765", "status": "COMPLETE"}]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setitem(
        kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, f"http://127.0.0.1:{server.server_port}"
    )
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kaggle of the machine's
    monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")
    yield server
    server.shutdown()


@pytest.fixture
def own_file(tmp_path) -> Path:
    """A submission file with the sidecar the pipeline writes (its sha256 recorded)."""
    sub = tmp_path / "submissions" / "iceberg-exp-20261207T000000Z.csv"
    sub.parent.mkdir()
    sub.write_text("id,is_iceberg\na,0.25\nb,0.75\n")
    meta = {
        "file": sub.name,
        "competition": "statoil-iceberg-classifier-challenge",
        "experiment": "exp",
        "metric": "logloss",
        "oof_score": 0.2,
        "sha256": hashlib.sha256(sub.read_bytes()).hexdigest(),
    }
    sub.with_suffix(".json").write_text(json.dumps(meta))
    return sub


def _files(root: Path) -> dict:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}


def test_submit_sends_the_file_and_records_the_reply_then_fetches_the_score(kaggle_server, own_file, capsys):
    assert run_cli("submit", own_file, "-m", "lite0 5 folds") == 0
    posts = [c for c in kaggle_server.calls if c[0] == "POST" and SERVICE in c[1]]
    start, create = posts[0], posts[1]
    assert start[1].endswith("StartSubmissionUpload") and start[3] == "Bearer test-token"
    assert start[2]["competitionName"] == "statoil-iceberg-classifier-challenge"
    assert start[2]["fileName"] == own_file.name and int(start[2]["contentLength"]) == own_file.stat().st_size
    assert kaggle_server.uploads["/upload/blob-1"] == own_file.read_bytes()
    assert create[2]["blobFileTokens"] == "blob-1" and create[2]["submissionDescription"] == "lite0 5 folds"
    sent = json.loads(own_file.with_suffix(".json").read_text())["kaggle"]
    assert sent["ref"] == 4242 and sent["reply"].startswith("Successfully submitted") and sent["message"]
    from pipeline.evaluate.experiments import submission_records

    assert submission_records(own_file.parent)["kaggle"].tolist() == ["4242"]  # `pipeline experiments` shows it
    assert run_cli("lb", own_file, "--fetch") == 0
    assert kaggle_server.calls[-1][1].endswith("ListSubmissions")
    assert kaggle_server.calls[-1][2]["competitionName"] == "statoil-iceberg-classifier-challenge"
    meta = json.loads(own_file.with_suffix(".json").read_text())
    assert meta["lb_score"] == pytest.approx(0.18765)
    assert "0.18765" in (own_file.parent / "leaderboard.csv").read_text()


def test_competition_flag_wins(kaggle_server, own_file):
    assert run_cli("submit", own_file, "-m", "x", "--competition", "other-slug") == 0
    assert [c[2]["competitionName"] for c in kaggle_server.calls if SERVICE in c[1]][0] == "other-slug"


def _refused(capsys, server, argv, needle, root):
    before = _files(root)
    err = cli_error(capsys, *argv)
    assert needle in err, err
    assert _files(root) == before
    return err


def test_http_errors_and_pending_scores_are_one_line(kaggle_server, own_file, capsys):
    kaggle_server.fail = 403
    _refused(
        capsys,
        kaggle_server,
        ["submit", own_file, "-m", "x"],
        "HTTP 403; accept the competition's rules",
        own_file.parent,
    )
    kaggle_server.fail = 0
    assert run_cli("submit", own_file, "-m", "x") == 0
    kaggle_server.listed = [{"ref": 4242, "status": "PENDING"}]
    _refused(capsys, kaggle_server, ["lb", own_file, "--fetch"], "has no public score yet", own_file.parent)
    kaggle_server.listed = [{"ref": 1, "publicScore": "0.5", "status": "COMPLETE"}]
    _refused(capsys, kaggle_server, ["lb", own_file, "--fetch"], "submission 4242", own_file.parent)


def test_refusals_before_anything_is_sent(kaggle_server, own_file, capsys, monkeypatch):
    # a file the pipeline did not write (or changed since): not sent
    own_file.write_text("id,is_iceberg\na,0.3\nb,0.7\n")
    _refused(capsys, kaggle_server, ["submit", own_file, "-m", "x"], "sha256", own_file.parent)
    assert kaggle_server.calls == []
    # not submitted yet: nothing to fetch
    other = own_file.parent / "x.csv"
    _refused(capsys, kaggle_server, ["lb", other, "--fetch"], "not found", own_file.parent)


def test_no_credentials_no_network_no_package(kaggle_server, own_file, capsys, monkeypatch):
    import sys

    root = own_file.parent
    monkeypatch.delenv("KAGGLE_API_TOKEN")
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    _refused(capsys, kaggle_server, ["submit", own_file, "-m", "x"], "no Kaggle credentials", root)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")
    from kagglesdk import kaggle_env

    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, "http://127.0.0.1:9")  # closed
    _refused(capsys, kaggle_server, ["submit", own_file, "-m", "x"], "cannot reach the Kaggle API", root)
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", None)
    _refused(capsys, kaggle_server, ["submit", own_file, "-m", "x"], "the kaggle package is not installed", root)
    assert [c for c in kaggle_server.calls if c[0] == "PUT"] == []
