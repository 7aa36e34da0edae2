"""The "filled box as mask" baseline: the floor every box-supervised method must beat."""

from __future__ import annotations

from pmvis.platform.ytvis import Result, YTVISDataset, box_mask_rle

BASELINE_SCORE = 1.0


def filled_box_results(dataset: YTVISDataset) -> list[Result]:
    """One result per annotation whose mask in each frame is its filled ground-truth box."""
    results = []
    for ann in dataset.annotations:
        video = dataset.videos[ann.video_id]
        segs = [None if box is None else box_mask_rle(box, video.height, video.width) for box in ann.bboxes]
        results.append(Result(video_id=ann.video_id, category_id=ann.category_id, score=BASELINE_SCORE,
                              segmentations=segs))
    return results


def annotations_as_results(dataset: YTVISDataset) -> list[Result]:
    """The annotation masks as predictions, to score an annotation file against the truth."""
    return [Result(video_id=a.video_id, category_id=a.category_id, score=BASELINE_SCORE,
                   segmentations=list(a.segmentations)) for a in dataset.annotations]
