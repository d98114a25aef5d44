"""``--weights yolov5n.pt`` with no such file: YOLOv5's release file is fetched into the weights cache, once.

The "release" is served over real HTTP from a local server holding ../shared/weights/yolov5n.pt
(``DETECTOR_RELEASE_URL`` points the download there), so nothing leaves the machine.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from detector.config import TrainConfig, check_train_config
from detector.engine.predictor import Detector
from detector.errors import CheckpointError, ConfigError
from detector.models.release import RELEASE_NAMES, resolve_release_weights, weights_cache_dir


@pytest.fixture
def release_server(yolov5n_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """An HTTP server with yolov5n.pt at its root, set as the release URL; yields the paths it was asked for.

    The working directory and the weights cache are empty folders under ``tmp_path``."""
    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Handler, directory=str(yolov5n_weights.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DETECTOR_RELEASE_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("DETECTOR_WEIGHTS_DIR", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    try:
        yield requested
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_release_name_is_fetched_once_and_detects_as_the_file_does(
    release_server: list[str], yolov5n_weights: Path, shared_images: Path, tmp_path: Path
) -> None:
    assert "yolov5n.pt" in RELEASE_NAMES and "yolov5x6.pt" in RELEASE_NAMES
    fetched = Detector("yolov5n.pt", device="cpu")(shared_images / "bus.jpg")[0]
    cached = tmp_path / "cache" / "yolov5n.pt"
    assert weights_cache_dir() == tmp_path / "cache" and release_server == ["/yolov5n.pt"]
    assert cached.read_bytes() == yolov5n_weights.read_bytes()  # the whole file, byte for byte
    assert not Path("yolov5n.pt").exists()  # nothing written into the working directory

    local = Detector(yolov5n_weights, device="cpu")(shared_images / "bus.jpg")[0]
    assert fetched.summary() == local.summary() == "4 persons, 1 bus"
    np.testing.assert_array_equal(fetched.boxes, local.boxes)
    assert resolve_release_weights("yolov5n.pt") == cached and release_server == ["/yolov5n.pt"]  # cached: no 2nd GET


def test_only_bare_release_names_are_fetched_and_a_failed_fetch_is_one_line(
    release_server: list[str], tmp_path: Path
) -> None:
    for other in ("mymodel.pt", "weights/yolov5n.pt", "yolov5n.onnx"):
        assert resolve_release_weights(other) == Path(other)  # left as given: "not found" later, as before
    with pytest.raises(CheckpointError, match=r"yolov5s\.pt: not found here, .*HTTP 404") as error:
        resolve_release_weights("yolov5s.pt")  # the server has no such file
    assert "\n" not in str(error.value) and release_server == ["/yolov5s.pt"]
    assert not (tmp_path / "cache" / "yolov5s.pt").exists()
    # a release name passes the up-front --teacher check (it is fetched when the teacher loads); another does not
    check_train_config(TrainConfig(teacher="yolov5m.pt", unlabeled=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"--teacher teacher\.pt: weights file not found"):
        check_train_config(TrainConfig(teacher="teacher.pt", unlabeled=str(tmp_path)))
