"""The L-CAM paper's Table 1, keyed by Table 1 preset and row, for reports of preset runs.

Gkartzonika, Gkalelis & Mezaris, *Learning visual explanations for DCNN-based image
classifiers using an attention mechanism* (ECCV 2022 Workshops), Table 1: AD and IC (%) with
100%, 50% and 15% of each map kept, and #FW, on 2,000 ImageNet validation images
(``Evaluation_2000.txt``). AD: lower is better; IC: higher is better.

A preset job (``jobs/table1_<preset>.yaml``) tags every run ``table1: <preset>``; its rows
are its method ids (the same in every preset). ``harness report`` shows, next to each
number of a tagged run, the paper's value and the difference (ours - paper)
(``harness.results.report``). docs/protocol.md section 6 says which variant each row came
from.
"""
from __future__ import annotations

#: the run tag a Table 1 preset sets (``tracking.tags: {table1: <preset>}``)
TAG = "table1"
#: the columns, in Table 1's order
COLUMNS = ("AD_100", "IC_100", "AD_50", "IC_50", "AD_15", "IC_15", "FW")

_ROWS = {        # preset -> method id -> Table 1's values in COLUMNS' order
    "vgg16": {
        "gradcam": (32.12, 22.1, 58.65, 9.5, 84.15, 2.2, 1),
        "gradcampp": (30.75, 22.05, 54.11, 11.15, 82.72, 3.15, 1),
        "scorecam": (27.75, 22.8, 45.6, 14.1, 75.7, 4.3, 512),
        "rise": (8.74, 51.3, 42.42, 17.55, 78.7, 4.45, 4000),
        "lcam_fm_ce": (20.63, 31.05, 51.34, 13.45, 82.4, 3.05, 1),
        "lcam_fm": (16.47, 35.4, 47.0, 14.45, 79.39, 3.65, 1),
        "lcam_img_ce": (18.01, 37.2, 50.88, 12.05, 82.1, 3.0, 1),
        "lcam_img": (12.96, 41.25, 45.56, 14.9, 78.14, 4.2, 1),
    },
    "vgg16_7x7": {                                  # the dagger row: A after the last max-pool
        "lcam_img": (12.15, 40.95, 37.37, 20.25, 74.23, 4.45, 1),
    },
    "resnet50": {
        "gradcam": (13.61, 38.1, 29.28, 23.05, 78.61, 3.4, 1),
        "gradcampp": (13.63, 37.95, 30.37, 23.45, 79.58, 3.4, 1),
        "scorecam": (11.01, 39.55, 26.8, 24.75, 78.72, 3.6, 2048),
        "rise": (11.12, 46.15, 36.31, 21.55, 82.05, 3.2, 8000),
        "lcam_fm_ce": (14.44, 35.45, 32.18, 20.5, 80.66, 2.9, 1),
        "lcam_fm": (12.16, 40.2, 29.44, 23.4, 78.64, 4.1, 1),
        "lcam_img_ce": (15.93, 32.8, 39.9, 14.85, 84.67, 2.25, 1),
        "lcam_img": (11.09, 43.75, 29.12, 24.1, 79.41, 3.9, 1),
    },
}

#: preset -> method id -> {column: the paper's value}
PAPER: dict[str, dict[str, dict[str, float]]] = {
    preset: {row: dict(zip(COLUMNS, map(float, values))) for row, values in rows.items()}
    for preset, rows in _ROWS.items()}


def presets() -> list[str]:
    """The Table 1 presets (``jobs/table1_<preset>.yaml``)."""
    return list(PAPER)


def paper_row(preset: str | None, row: str | None) -> dict[str, float]:
    """Table 1's values of ``row`` (a method id) in ``preset``; {} for anything else (an
    untagged run, a row the paper does not have)."""
    return dict(PAPER.get(preset or "", {}).get(row or "", {}))


def comparison(ours: dict, paper: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{column: (the paper's value, ours - paper)} for the columns both have."""
    return {col: (value, float(ours[col]) - value) for col, value in paper.items()
            if ours.get(col) is not None}
