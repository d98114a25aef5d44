"""README.md's links within the page (its Contents list and the cross-references) lead to one of its headings."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation other than '-' and '_' dropped, each
    space a '-' (so "Weights & Biases" becomes "weights--biases")."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_of_headings_with_punctuation():
    assert github_anchor("Side by side with YOLOv5: `--compare-yolov5`") == "side-by-side-with-yolov5---compare-yolov5"
    assert github_anchor("Experiment tracking: TensorBoard, MLflow, Weights & Biases") == (
        "experiment-tracking-tensorboard-mlflow-weights--biases"
    )
    assert github_anchor("GPU check: `scripts/gpu_check.sh`") == "gpu-check-scriptsgpu_checksh"


def test_every_link_within_the_readme_has_its_heading():
    text = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)  # '#' in code is no heading
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        anchor = github_anchor(heading)
        repeat = 1
        while anchor in anchors:  # GitHub numbers repeated headings: name, name-1, name-2, ...
            anchor = f"{github_anchor(heading)}-{repeat}"
            repeat += 1
        anchors.add(anchor)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) > 40  # the Contents list and the cross-references
    assert [link for link in links if link not in anchors] == []
