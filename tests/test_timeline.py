"""Reading Horovod's timeline as Horovod writes it: ends without begins, and a file cut anywhere
while it is still being written."""

from __future__ import annotations

import json

from distaccum.timeline import collective_bytes, collective_counts, load_events

GRADIENTS, WEIGHTS = 1, 2
EVENTS = [
    # The end of a negotiation that began in the previous file (distaccum/timeline.py).
    {"ph": "E", "ts": 1, "pid": GRADIENTS},
    {"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 2, "pid": GRADIENTS},
    {"ph": "X", "name": "0", "ts": 2, "pid": GRADIENTS, "dur": 0},
    {"ph": "E", "ts": 3, "pid": GRADIENTS},
    {"ph": "B", "name": "ALLREDUCE", "ts": 4, "pid": GRADIENTS},
    {"ph": "B", "name": "GLOO_ALLREDUCE", "ts": 5, "pid": GRADIENTS},
    {"ph": "E", "ts": 6, "pid": GRADIENTS},
    # Another end with no begin, inside the allreduce.
    {"ph": "E", "ts": 7, "pid": GRADIENTS},
    {"ph": "E", "ts": 8, "pid": GRADIENTS, "args": {"dtype": "float32", "shape": "[10, 4]"}},
    {"ph": "B", "name": "BROADCAST", "ts": 9, "pid": WEIGHTS},
    {"ph": "E", "ts": 10, "pid": WEIGHTS, "args": {"dtype": "float32", "shape": "[3]"}},
    {"ph": "B", "name": "ALLREDUCE", "ts": 11, "pid": WEIGHTS},
    {"ph": "E", "ts": 12, "pid": WEIGHTS, "args": {"dtype": "float16", "shape": "[3]"}},
    # Still under way when the file closed: its begin alone, its end in the next file.
    {"ph": "B", "name": "ALLREDUCE", "ts": 13, "pid": GRADIENTS},
]
NAMES = {GRADIENTS: "HorovodGroupedAllreduce_gradients_0", WEIGHTS: "weights"}


def horovod_text(events: list[dict]) -> tuple[str, list[int]]:
    """The file as Horovod's TimelineWriter leaves it after each event, and where each event's
    text ends: a tensor's first event is preceded by its "process" rows (each on a line of its
    own), and every event is written as `{...}]`, the `]` overwritten by `,` before the next."""
    text, ends, seen = "[\n", [], set()
    for event in events:
        if event["pid"] not in seen:
            seen.add(event["pid"])
            text += json.dumps({"name": "process_name", "ph": "M", "pid": event["pid"],
                                "args": {"name": NAMES[event["pid"]]}}) + ",\n"
            text += json.dumps({"name": "process_sort_index", "ph": "M", "pid": event["pid"],
                                "args": {"sort_index": event["pid"]}}) + ",\n"
        text += json.dumps(event)
        ends.append(len(text))
        text += ","
    return text[:-1] + "]", ends


def test_each_collective_counts_once_with_its_size_when_ends_have_no_begins(tmp_path):
    path = tmp_path / "timeline.json"
    path.write_text(horovod_text(EVENTS)[0])
    counts = collective_counts(path)
    assert counts[NAMES[GRADIENTS]] == {"ALLREDUCE": 2}
    assert counts[NAMES[WEIGHTS]] == {"BROADCAST": 1, "ALLREDUCE": 1}
    # The finished allreduces' sizes; the broadcast's and the unfinished one's are not.
    assert collective_bytes(path) == {"float32": 10 * 4 * 4, "float16": 3 * 2}


def test_every_complete_event_is_read_when_the_file_is_cut_anywhere(tmp_path):
    text, ends = horovod_text(EVENTS)
    path = tmp_path / "timeline.json"
    for cut in range(len(text) + 1):
        path.write_text(text[:cut])
        events = [event for event in load_events(path) if event["ph"] != "M"]
        assert events == EVENTS[:sum(end <= cut for end in ends)], text[:cut][-40:]
