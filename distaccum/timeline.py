"""Read Horovod's timeline (`HOROVOD_TIMELINE=file.json`): how many collectives ran, per tensor.

The timeline is a Chrome trace with one "process" row per tensor name; each collective on that
tensor opens a top-level activity such as `ALLREDUCE` or `BROADCAST`, whose end records the
tensor's dtype and shape. Counting those is the proof that distaccum communicates once per update
and never on micro-steps; their sizes, of how many bytes an update sends.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

COLLECTIVES = ("ALLREDUCE", "BROADCAST", "ALLGATHER", "ALLTOALL", "REDUCESCATTER", "JOIN")


def load_events(path: str | Path) -> list[dict]:
    """The trace's events; tolerates the unterminated array Horovod leaves while still running."""
    text = Path(path).read_text().rstrip().rstrip(",")
    if not text.endswith("]"):
        text += "]"
    return json.loads(text)


def collective_counts(path: str | Path) -> dict[str, Counter]:
    """For each tensor name, how many times each collective ran on it.

    Returns:
        `{tensor_name: Counter({"ALLREDUCE": n, ...})}`.
    """
    events = load_events(path)
    tensor_names = {
        event["pid"]: event["args"]["name"]
        for event in events
        if event.get("ph") == "M" and event.get("name") == "process_name" and "name" in event["args"]
    }
    counts: dict[str, Counter] = {name: Counter() for name in tensor_names.values()}
    for event in events:
        if event.get("ph") == "B" and event.get("name") in COLLECTIVES:
            counts[tensor_names[event["pid"]]][event["name"]] += 1
    return counts


def allreduce_bytes(path: str | Path) -> Counter:
    """Bytes allreduced over the whole timeline, by dtype name (`{"float32": n, ...}`): each
    `ALLREDUCE` activity counts its tensor's size once."""
    open_activities: dict[int, list[str]] = defaultdict(list)
    sent: Counter = Counter()
    for event in load_events(path):
        if event.get("ph") == "B":
            open_activities[event["pid"]].append(event.get("name"))
        elif event.get("ph") == "E":
            name = open_activities[event["pid"]].pop()
            details = event.get("args", {})
            if name == "ALLREDUCE" and "dtype" in details:
                shape = json.loads(details["shape"])
                sent[details["dtype"]] += int(np.prod(shape)) * np.dtype(details["dtype"]).itemsize
    return sent
