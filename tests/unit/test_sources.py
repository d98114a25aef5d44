"""detect.py's sources: files, folders, globs, lists, videos, streams, arrays, and one-line errors for bad ones."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.engine.sources import FileSource, Frame, StreamSource, open_source
from detector.errors import DataError


def _image(seed: int, height: int = 24, width: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_video(path: Path, frames: int, size: tuple[int, int] = (32, 24), fps: float = 10.0) -> list[np.ndarray]:
    """A small mp4v video whose frame i is filled with grey level 20 * i (easy to identify after compression)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, size)
    images = [np.full((size[1], size[0], 3), 20 * i, dtype=np.uint8) for i in range(frames)]
    for image in images:
        writer.write(image)
    writer.release()
    return images


def _frames(source) -> list[Frame]:
    return [frame for batch in source for frame in batch]


def test_folder_mixed_formats_natural_order_and_lossless_pixels(tmp_path: Path) -> None:
    originals = {}
    for i, suffix in enumerate([".png", ".bmp", ".tif", ".webp", ".jpg"]):
        name = f"img{[10, 2, 1, 3, 4][i]}{suffix}"
        originals[name] = _image(i)
        params = [cv2.IMWRITE_WEBP_QUALITY, 101] if suffix == ".webp" else []  # quality > 100 = lossless WebP
        cv2.imwrite(str(tmp_path / name), originals[name], params)
    (tmp_path / "notes.txt").write_text("not an image")
    frames = _frames(open_source(tmp_path))
    assert [Path(f.path).name for f in frames] == ["img1.tif", "img2.bmp", "img3.webp", "img4.jpg", "img10.png"]
    assert [(f.index, f.count, f.kind) for f in frames] == [(i, 5, "image") for i in range(1, 6)]
    for frame in frames:
        name = Path(frame.path).name
        assert frame.image.shape == (24, 32, 3) and frame.image.dtype == np.uint8
        if not name.endswith(".jpg"):  # lossless formats round-trip exactly
            np.testing.assert_array_equal(frame.image, originals[name])


def test_corrupt_image_in_folder_is_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), _image(0))
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (tmp_path / "c.png").write_bytes(b"")
    source = open_source(tmp_path)
    frames = _frames(source)
    assert [Path(f.path).name for f in frames] == ["a.png"]
    assert source.skipped == 2
    assert "b.jpg: not a decodable image" in caplog.text
    assert "c.png: image file is empty (0 bytes)" in caplog.text


def test_single_unreadable_image_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(
        DataError, match=r"bad\.png: not a decodable image \(corrupt, or a format OpenCV cannot read\)$"
    ):
        _frames(open_source(bad))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.jpg", "source not found"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "folder has no images or videos"),
        (lambda d: d / "*.jpg", "pattern matches no images"),
        (lambda d: (d / "x.pdf").write_bytes(b"%PDF") and d / "x.pdf", "unsupported file type '.pdf'"),
        (lambda d: (d / "l.txt").write_text("nothere.jpg\n") and d / "l.txt", r"l\.txt line 1: nothere\.jpg not found"),
        (lambda d: (d / "s.streams").write_text("# nothing\n") and d / "s.streams", "names no streams"),
    ],
    ids=["missing", "empty-folder", "glob", "suffix", "list-entry", "empty-streams"],
)
def test_bad_sources_raise_one_line_data_error(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(DataError, match=message) as error:
        _frames(open_source(str(make(tmp_path))))
    assert "\n" not in str(error.value)


def test_glob_and_txt_list(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["sub/a.jpg", "sub/b.png", "c.jpg"]:
        cv2.imwrite(str(tmp_path / name), _image(1))
    globbed = [Path(f.path).name for f in _frames(open_source(str(tmp_path / "**" / "*.jpg")))]
    assert globbed == ["c.jpg", "a.jpg"]  # natural order of full paths: tmp/c.jpg < tmp/sub/a.jpg
    listing = tmp_path / "list.txt"
    listing.write_text("sub/b.png\n# a comment\n\nc.jpg\n")  # relative to the list's folder
    assert [Path(f.path).name for f in _frames(open_source(listing))] == ["b.png", "c.jpg"]


def test_video_frames_numbers_and_stride(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    images = _write_video(video, frames=10)
    frames = _frames(open_source(video))
    assert [f.frame for f in frames] == list(range(1, 11))
    assert {(f.kind, f.frames, f.fps) for f in frames} == {("video", 10, 10.0)}
    # mp4v's YUV round trip shifts grey levels by a few units; levels 20 apart still identify each frame
    grey_levels = [float(f.image.mean()) for f in frames]
    assert all(abs(level - im.mean()) <= 5 for level, im in zip(grey_levels, images, strict=True))
    strided = _frames(open_source(video, vid_stride=3))
    assert [f.frame for f in strided] == [1, 4, 7, 10]
    assert strided[0].fps == pytest.approx(10.0 / 3)
    assert abs(strided[1].image.mean() - images[3].mean()) <= 5  # frame 4 really is the 4th frame
    assert frames[2].describe().startswith("video 1/1 (frame 3/10) ")


def test_unreadable_video_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(DataError, match=r"broken\.mp4: cannot read video"):
        _frames(open_source(bad))


def test_folder_with_video_and_images(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.jpg"), _image(2))
    _write_video(tmp_path / "b.avi", frames=3)
    source = open_source(tmp_path)
    assert isinstance(source, FileSource) and source.has_video
    kinds = [(f.kind, f.index, f.frame) for f in _frames(source)]
    assert kinds == [("image", 1, 0), ("video", 2, 1), ("video", 2, 2), ("video", 2, 3)]


def test_arrays_and_mixed_lists(tmp_path: Path) -> None:
    image = _image(3)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), image)
    frames = _frames(open_source([image, str(path)]))
    assert [f.path for f in frames] == ["image0", str(path)]
    np.testing.assert_array_equal(frames[1].image, image)
    assert frames[0].image is image  # arrays are used as they are, no copy
    for bad in (image.astype(np.float32), np.dstack((image, image[:, :, :1])), image.transpose(2, 0, 1)):
        with pytest.raises(DataError, match=r"expected an \(H, W, 3\) uint8 BGR image or an \(H, W\) grey one"):
            open_source(bad)
    with pytest.raises(DataError, match="vid-stride"):
        open_source(image, vid_stride=0)


def test_stream_source_reads_in_background_and_ends(tmp_path: Path) -> None:
    first, second = tmp_path / "one.mp4", tmp_path / "two.mp4"
    _write_video(first, frames=8)
    _write_video(second, frames=5)
    listing = tmp_path / "cams.streams"
    listing.write_text(f"{first}\n{second}\n")
    source = open_source(listing)
    assert isinstance(source, StreamSource) and source.is_live
    seen: dict[int, list[int]] = {0: [], 1: []}
    for batch in source:
        assert len({f.index for f in batch}) == len(batch)  # at most one (the newest) frame per stream per batch
        for frame in batch:
            seen[frame.index].append(frame.frame)
    for index, total in ((0, 8), (1, 5)):
        assert seen[index] == sorted(set(seen[index])), "a stream frame was yielded twice or out of order"
        assert seen[index][-1] == total  # the last frame is always delivered before the stream ends
    assert not any(t.is_alive() for t in source._threads)


def test_missing_webcam_and_unreachable_stream_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="webcam 99: cannot be opened"):
        open_source("99")
    with pytest.raises(DataError, match=r"stream rtsp://127\.0\.0\.1:1/none: cannot be opened"):
        open_source("rtsp://127.0.0.1:1/none")
    _write_video(tmp_path / "ok.mp4", frames=2)
    (tmp_path / "mixed.streams").write_text(f"{tmp_path / 'ok.mp4'}\nrtsp://127.0.0.1:1/other\n")
    with pytest.raises(DataError, match="other: cannot be opened"):  # the good stream is released, no thread left
        open_source(tmp_path / "mixed.streams")


def test_image_url_is_downloaded_into_memory(tmp_path: Path) -> None:
    image = _image(4)
    cv2.imwrite(str(tmp_path / "remote.png"), image)
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/remote.png"
        frames = _frames(open_source(url))
        np.testing.assert_array_equal(frames[0].image, image)
        with pytest.raises(DataError, match="cannot download"):
            open_source(url.replace("remote.png", "absent.png"))
    finally:
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_grey_arrays_become_what_opencv_reads_from_a_grey_file(tmp_path: Path) -> None:
    """A camera's grey frame, (H, W) or (H, W, 1), is taken as OpenCV's colour read of the same grey PNG."""
    grey = _image(5)[:, :, 1].copy()
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    from_file, flat, single_channel = _frames(open_source([tmp_path / "grey.png", grey, grey[:, :, None]]))
    assert from_file.image.shape == (*grey.shape, 3)
    np.testing.assert_array_equal(flat.image, from_file.image)
    np.testing.assert_array_equal(single_channel.image, from_file.image)


def test_pil_images_become_upright_bgr_arrays_as_their_files_read(tmp_path: Path) -> None:
    """YOLOv5's AutoShape takes PIL images; so does the Python API: RGB (or any mode) to BGR, EXIF applied."""
    from PIL import Image

    bgr = _image(0)
    rgb = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    (frame,) = _frames(open_source(rgb))
    np.testing.assert_array_equal(frame.image, bgr)
    gray = Image.fromarray(bgr[:, :, 0])  # mode L: the grey value in all three channels
    (frame,) = _frames(open_source(gray))
    np.testing.assert_array_equal(frame.image, np.repeat(bgr[:, :, :1], 3, axis=2))
    # orientation 6 (rotate 90 clockwise to display): PIL must give what reading the file gives, 32x24 -> 24x32
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(tmp_path / "rotated.png", exif=exif)
    from_pil, from_file, array = _frames(
        open_source([Image.open(tmp_path / "rotated.png"), tmp_path / "rotated.png", bgr])
    )
    assert from_pil.image.shape == (32, 24, 3)
    np.testing.assert_array_equal(from_pil.image, from_file.image)
    np.testing.assert_array_equal(from_pil.image, np.rot90(bgr, k=-1))
    np.testing.assert_array_equal(array.image, bgr)
    with pytest.raises(DataError, match="list item 1: expected a path, an image array or a PIL image, got float"):
        open_source([bgr, 1.5])


@pytest.mark.parametrize("source", [torch.zeros(1, 3, 8, 8), None, 2.5], ids=["tensor", "none", "float"])
def test_other_objects_are_refused_by_type_not_taken_for_file_names(source: object) -> None:
    with pytest.raises(DataError, match=f"source: expected a path, URL, .* got {type(source).__name__}$"):
        open_source(source)
