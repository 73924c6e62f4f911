"""Which (method, dataset) tasks of one run read one stream of images.

voc/voc20, context/context59 and coco_stuff/coco_object list the same image files. Where two
tasks read the same files with the same image-side settings (resize, interpolation, crop,
windows), and both methods' image features do not depend on the vocabulary
(``WindowMethod.shares_features``), they run as one stream: each image is decoded, resized and
cut into windows once, each method embeds a window once (methods with a common trunk compute
it once, engine/sharing.py), and every task scores its own vocabulary, background rule and
post-processing on it. Each task still writes its own result, equal to a run of it alone.

Everything else runs on its own, and the run says why in one line where a partner was there.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable

from .engine.sharing import sharing_notes
from .tracks import get_track
from .tracks.semantic import WindowScorer

# The settings that decide the pixels of every window; the class names and the image labels
# of the label-conditioned track do not.
IMAGE_FIELDS = ("short_side", "long_side", "resize", "center_crop", "interpolation", "mode", "crop", "stride")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One method on one dataset: the plan's job, the card and its listing."""

    job: Any
    card: Any
    samples: list[Any]

    @property
    def label(self) -> str:
        return f"{self.job.request.method}/{self.card.name}"


def image_key(task: Task) -> tuple[Any, ...]:
    """What two tasks must share to read one stream: the track, the image files in order and
    the image-side settings."""
    if task.card.track != "semantic":
        return ("own", id(task))  # the other tracks read per item, never as a stream
    settings = task.job.settings(task.card)
    files = tuple((ref.image_id, str(ref.image_path)) for ref in task.samples)
    return (task.card.track, files, tuple(getattr(settings, name) for name in IMAGE_FIELDS))


def unshareable(task: Task) -> str | None:
    """Why ``task`` cannot join a stream, or None."""
    method = task.job.method
    track = get_track(task.card.track)
    if track.name != "semantic" or track.scorer_class(method, task.card) is not WindowScorer:
        return f"its {track.name} adapter does not run through the shared window engine"
    if not type(method).shares_features:
        return "its window scores are not split into vocabulary-free features and a score"
    return None


def plan_streams(tasks: list[Task], *, alone: Callable[[Task], str | None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> list[list[Task]]:
    """``tasks`` grouped into streams, in order of their first task; ``alone(task)`` may give a
    reason of the run's own (a saved state to continue) to keep a task out of any stream."""
    keys = {id(task): image_key(task) for task in tasks}
    by_key: dict[Any, list[Task]] = defaultdict(list)
    for task in tasks:
        by_key[keys[id(task)]].append(task)
    reasons = {id(task): unshareable(task) or (alone(task) if alone else None) for task in tasks}
    groups: list[list[Task]] = []
    notes: list[str] = []
    placed: dict[int, list[Task]] = {}
    for task in tasks:
        if id(task) in placed:
            continue
        partners = by_key[keys[id(task)]]
        shareable = [t for t in partners if reasons[id(t)] is None]
        if task in shareable and len(shareable) > 1:
            group = shareable
        else:
            group = [task]
            reason = reasons[id(task)]
            if reason and len(partners) > 1:
                notes.append(f"{task.label}: runs its own passes, {reason}")
        for member in group:
            placed[id(member)] = group
        groups.append(group)
    notes += _stream_notes(groups) + _apart_notes(tasks, placed, keys)
    if on_note is not None:
        for note in dict.fromkeys(notes):
            on_note(note)
    return groups


def _stream_notes(groups: list[list[Task]]) -> list[str]:
    notes = []
    for group in groups:
        if len(group) < 2:
            continue
        cards = list(dict.fromkeys(task.card.name for task in group))
        methods = list({id(task.job.method): task.job.method for task in group}.values())
        notes.append(f"shared stream: {' and '.join(cards)}: each image decoded, resized and cut into windows once "
                     f"for {', '.join(m.name for m in methods)}")
        settings = group[0].job.settings(group[0].card)
        if len(methods) > 1:
            notes += sharing_notes(methods, (settings.crop, settings.crop))
    return notes


def _apart_notes(tasks: list[Task], placed: dict[int, list[Task]], keys: dict[int, tuple[Any, ...]]) -> list[str]:
    """Paired datasets of one method that still read their images apart, and why."""
    notes = []
    for task in tasks:
        partner_name = getattr(task.card, "shares_images_with", None)
        partner = next((t for t in tasks if t.job is task.job and t.card.name == partner_name), None)
        if partner is None or placed[id(partner)] is placed[id(task)] or task.card.name > partner_name:
            continue
        if keys[id(task)][1] != keys[id(partner)][1]:
            why = "their listings name other image files"
        elif keys[id(task)] != keys[id(partner)]:
            why = f"their image settings differ under preset '{task.job.preset.name}'"
        else:
            continue  # kept apart for a reason already noted
        notes.append(f"{task.card.name} and {partner_name} read their images apart for "
                     f"{task.job.request.method}: {why}")
    return notes
