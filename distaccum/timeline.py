"""Read Horovod's timeline (`HOROVOD_TIMELINE=file.json`): how many collectives ran, per tensor.

The timeline is a Chrome trace with one "process" row per tensor name; each collective on that
tensor opens a top-level activity such as `ALLREDUCE` or `BROADCAST`, whose end records the
tensor's dtype and shape. Counting those is the proof that distaccum communicates once per update
and never on micro-steps; their sizes, of how many bytes an update sends.

Begin and end events do not always pair up. Horovod writes each end whatever its own record of
the tensor's state says (the asserts that would check it are compiled out), and that record
outlives a dynamic timeline's file (`hvd.start_timeline`, `hvd.stop_timeline`, which only rank 0
obeys). When another rank starts the next run first, rank 0 begins negotiating that run's
start-up broadcast while still writing the previous run's file: the negotiation's begin lands in
one file, its end in the next (1 launch of 10 of the rows test, 2026-12-05). The readers here
never pair events by nesting: a collective is counted by its begin, its size read from the end
that carries a dtype and shape (only a top-level activity's end does).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

COLLECTIVES = ("ALLREDUCE", "BROADCAST", "ALLGATHER", "ALLTOALL", "REDUCESCATTER", "JOIN")


def load_events(path: str | Path) -> list[dict]:
    """The trace's events, also while Horovod is still writing it.

    A finished timeline is one JSON array. A running one may be empty, lack the closing `]`, or
    end inside the event being written: that event is left out.
    """
    text = Path(path).read_text().rstrip().rstrip(",")
    if not text:
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        failure = error
    # An event holds at most one object (its args): at most two cuts back to a complete event.
    for _ in range(3):
        try:
            return json.loads(text + "]")
        except json.JSONDecodeError:
            cut = text.rfind("}", 0, len(text) - 1)
            text = text[:cut + 1] if cut >= 0 else text[:1]  # no event complete: "[" alone
    raise failure


def _tensor_names(events: list[dict]) -> dict[int, str]:
    """Each row's tensor name, by the row's `pid`."""
    return {event["pid"]: event["args"]["name"] for event in events
            if event.get("ph") == "M" and event.get("name") == "process_name"
            and "name" in event["args"]}


def collective_counts(path: str | Path) -> dict[str, Counter]:
    """For each tensor name, how many times each collective ran on it.

    Returns:
        `{tensor_name: Counter({"ALLREDUCE": n, ...})}`.
    """
    events = load_events(path)
    tensor_names = _tensor_names(events)
    counts: dict[str, Counter] = {name: Counter() for name in tensor_names.values()}
    for event in events:
        if event.get("ph") == "B" and event.get("name") in COLLECTIVES:
            counts[tensor_names[event["pid"]]][event["name"]] += 1
    return counts


def collective_bytes(path: str | Path, collective: str = "ALLREDUCE",
                     tensor_prefix: str = "") -> Counter:
    """Bytes of `collective` over the whole timeline, by dtype name (`{"float32": n, ...}`), on
    the rows whose tensor name starts with `tensor_prefix`: each activity counts its tensor's
    size once, read from its end event (the end on its row that carries a dtype and shape after
    the collective began there). An allreduce's is its tensor's; an allgather's, what it
    gathered; an alltoall's end carries none."""
    events = load_events(path)
    tensor_names = _tensor_names(events)
    top_level: dict[int, str] = {}
    sent: Counter = Counter()
    for event in events:
        if event.get("ph") == "B" and event.get("name") in COLLECTIVES:
            top_level[event["pid"]] = event["name"]
        elif event.get("ph") == "E" and "dtype" in event.get("args", {}):
            details = event["args"]
            if (top_level.pop(event["pid"], None) == collective
                    and tensor_names.get(event["pid"], "").startswith(tensor_prefix)):
                shape = json.loads(details["shape"])
                sent[details["dtype"]] += int(np.prod(shape)) * np.dtype(details["dtype"]).itemsize
    return sent
