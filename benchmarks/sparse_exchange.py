"""Figure 9, sparse exchange: the bytes an Embedding's gradient costs per update, sent as the dense
table or as the rows each window touched (distaccum's row exchange, `distaccum/rows.py`).

Measured: a text classifier (`Embedding` over a vocabulary of V = 50,000 tokens, widths d = 64
and 256, then average pooling and one logit) trains a few updates on two workers under `mpirun`
with the mpi4py backend, with `row_exchange` off and on; the backend counts the bytes each rank
puts into `Allreduce` and `Allgather`, and a fit of 3 updates minus a fit of 1 gives one update's
(the dense message D: gradient sums, window statistics, votes; or, with rows, D less the table
plus the rank's touched rows, 4 + 4d bytes each). Both are checked against what they should be:
`Trainer.allreduce_per_update`, and the distinct tokens of the rank's windows.
Modelled, for other N: a ring allreduce sends 2(N−1)/N × D per rank, whatever the tokens (D grows
by 4 bytes per rank, its vote); a ring allgather of the rows sends (N−1)·u·(4 + 4d) per rank, u
being a rank's distinct rows, with the rest of D still ring-allreduced. u is counted with numpy,
seeded: windows of T tokens per rank drawn independently from a Zipf distribution over the V
tokens (probability ∝ 1/rank^s, s = 1.0 and 1.1, as word frequencies in text), T = 2,048 …
131,072 (k × micro-batch × sequence length); 16 windows per T and s, median (min–max). Real text
is burstier than independent draws (a document repeats its words), so it touches fewer rows.
The modelled bytes leave out latency (rows take a second collective) and the scatter-add of
received rows; the time per update, measured on the two workers with the link between them
limited to 1 Gbit/s (a `tbf` qdisc on a network namespace's loopback, as `slow_link.py`), has
both. `--smoke` runs on the unlimited host loopback instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import common
import slow_link

# Tokens per rank-window, with one way to get there: (k, micro-batch, sequence length).
FULL_WINDOWS = {2_048: (1, 16, 128), 8_192: (4, 16, 128), 32_768: (8, 32, 128),
                131_072: (16, 32, 256)}
SMOKE_WINDOWS = {256: (1, 4, 64), 1_024: (4, 4, 64)}
FULL = {"vocabulary": 50_000, "widths": (64, 256), "ranks": (2, 8, 32, 128), "samples": 16}
SMOKE = {"vocabulary": 20_000, "widths": (8,), "ranks": (2, 8), "samples": 2}
EXPONENTS = (1.0, 1.1)
SEQUENCE_LENGTH = 64  # tokens per sample of the measured model (no part of its bytes)
INDEX_BYTES = 4  # int32 row index: V > 65,536 would not fit 16 bits at every V
VALUE_BYTES = 4  # float32, as distaccum's sums travel by default
MEASURED_WORKERS = 2
TIMED_LINK = ("1 Gbit/s", "1gbit")
TIMED_UPDATES = {"full": 6, "smoke": 1}
SEED = 0


def measured_messages(sizes: dict, prefix: Sequence[str] = (), timed_updates: int = 0,
                      repeats: int = 1) -> list[dict]:
    """Per width, with the row exchange off and on: one update's messages, counted by the
    mpi4py backend on 2 workers (under `prefix`, e.g. `ip netns exec NAME`), and with
    `timed_updates` its seconds, `repeats` times (summarised)."""
    with common.work_directory("sparse-exchange") as work:
        command = common.worker_command(
            "sparse-exchange", "--vocabulary", sizes["vocabulary"], "--widths", *sizes["widths"],
            "--length", SEQUENCE_LENGTH, "--timed-updates", timed_updates, "--repeats", repeats,
            "--out", work, num_workers=MEASURED_WORKERS, launcher="mpirun")
        common.run_command([*prefix, *command], work / "workers.log",
                           extra_env={"DISTACCUM_BACKEND": "mpi"}, timeout=1800)
        messages = common.read_json(work / common.CHIEF_RESULT)
    for message in messages:
        seconds = message["seconds_per_update"]
        message["seconds_per_update"] = common.summarize(seconds).as_dict() if seconds else None
    return messages


def distinct_rows(vocabulary: int, exponent: float, tokens: int, samples: int) -> common.Summary:
    """Distinct tokens in `samples` windows of `tokens` Zipf(`exponent`) draws over the
    vocabulary (seeded by the case, so each case's count is the same in every run)."""
    rng = np.random.default_rng([SEED, round(exponent * 100), tokens])
    probability = 1 / np.arange(1, vocabulary + 1) ** exponent
    probability /= probability.sum()
    return common.summarize(int(np.unique(rng.choice(vocabulary, size=tokens, p=probability)).size)
                            for _ in range(samples))


def break_even(vocabulary: int, width: int, ranks: int) -> float:
    """Distinct rows per rank-window below which the sparse allgather sends fewer bytes:
    (N−1)·u·(4 + 4d) < 2(N−1)/N · 4Vd  ⇔  u < 2V/N · 4d/(4 + 4d)."""
    row = INDEX_BYTES + VALUE_BYTES * width
    return 2 * vocabulary / ranks * VALUE_BYTES * width / row


def per_rank(message: dict, vocabulary: int, ranks: int, rows: float) -> dict:
    """Bytes one rank sends per update: the dense ring allreduce of the whole message, and the
    sparse scheme (its rows to N−1 ranks, the rest of the message ring-allreduced)."""
    width = message["width"]
    whole = message["bytes_per_update"] + 4 * (ranks - MEASURED_WORKERS)  # one vote per rank
    table = VALUE_BYTES * vocabulary * width
    ring = 2 * (ranks - 1) / ranks
    return {"dense": ring * whole,
            "sparse": (ranks - 1) * rows * (INDEX_BYTES + VALUE_BYTES * width)
            + ring * (whole - table)}


def winner(dense: float, sparse: float) -> str:
    return "sparse" if sparse < dense else "dense"


def megabytes(value: float) -> str:
    """Bytes as MB to three significant digits."""
    return f"{value / 1e6:,.3g}"


def table(sizes: dict, windows: dict, messages: list[dict], rows: dict) -> str:
    vocabulary, widths = sizes["vocabulary"], [m["width"] for m in messages]
    distinct = common.markdown_table(
        ["tokens per rank-window T (k × micro-batch × length)",
         *(f"distinct rows u, s = {s}: median (min–max), ÷ V" for s in EXPONENTS)],
        [[f"{tokens:,} ({' × '.join(map(str, shape))})",
          *(f"{rows[tokens, s].format()}, {rows[tokens, s].median / vocabulary:.1%}"
            for s in EXPONENTS)]
         for tokens, shape in windows.items()])
    message_lines = "; ".join(
        f"d = {m['width']}: {m['bytes_per_update']:,.0f} B per update (the embedding's "
        f"{VALUE_BYTES * m['embedding_parameters']:,} B, the rest "
        f"{m['bytes_per_update'] - VALUE_BYTES * m['embedding_parameters']:,.0f} B) in "
        f"{m['allreduces_per_update']:g} allreduce; `allreduce_per_update`: "
        f"{m['trainer_allreduce_per_update'][1]:,} B"
        for m in messages)
    exponents = " / ".join(str(s) for s in EXPONENTS)
    body = []
    for tokens in windows:
        for ranks in sizes["ranks"]:
            cells = [f"{tokens:,}", ranks,
                     " / ".join(f"{break_even(vocabulary, d, ranks):,.0f}" for d in widths)]
            for message in messages:
                costs = [per_rank(message, vocabulary, ranks, rows[tokens, s].median)
                         for s in EXPONENTS]
                cells += [megabytes(costs[0]["dense"]),
                          " / ".join(megabytes(c["sparse"]) for c in costs),
                          " / ".join(winner(c["dense"], c["sparse"]) for c in costs)]
            body.append(cells)
    comparison = common.markdown_table(
        ["T", "N", "break-even u, d = " + " / ".join(map(str, widths)),
         *(column for d in widths for column in (
             f"dense ring, MB per rank, d = {d}", f"sparse allgather, MB, d = {d}, s = {exponents}",
             f"fewer bytes, d = {d}, s = {exponents}"))],
        body)
    rule = (f"Break-even: the sparse exchange sends fewer bytes per rank exactly when a rank's "
            f"window touches fewer than u* = 2V/N × d/(d + 1) distinct rows (each row costs "
            f"{INDEX_BYTES} index bytes beside its {VALUE_BYTES}d value bytes, and goes to N − 1 "
            f"ranks; the ring sends each of the V·d values about 2(N − 1)/N times): about 2V/N, "
            f"less 1/(d + 1) for the index. For V = {vocabulary:,}: "
            + ", ".join(f"{break_even(vocabulary, widths[-1], n):,.0f} at N = {n}"
                        for n in sizes["ranks"]) + f" (d = {widths[-1]}).")
    return "\n\n".join([f"Dense message, counted on {MEASURED_WORKERS} workers: {message_lines}.",
                        distinct, comparison, rule])


def sparse_wins(sizes: dict, windows: dict, messages: list[dict], rows: dict) -> str:
    """Where the sparse allgather sends fewer bytes, per width and exponent."""
    parts = []
    for message in messages:
        for s in EXPONENTS:
            cases = [(tokens, n) for tokens in windows for n in sizes["ranks"]
                     if winner(**per_rank(message, sizes["vocabulary"], n,
                                          rows[tokens, s].median)) == "sparse"]
            total = len(windows) * len(sizes["ranks"])
            parts.append(f"d = {message['width']}, s = {s}: {len(cases)} of {total}")
    return "; ".join(parts)


def checks(sizes: dict, windows: dict, messages: list[dict], rows: dict) -> list[dict]:
    counted = [(m["bytes_per_update"], m["trainer_allreduce_per_update"][1]) for m in messages]
    agree = all(a == b for a, b in counted) and all(
        m["allreduces_per_update"] == m["expected_allreduces"] for m in messages)
    return [
        common.check("sparse exchange: bytes one update allreduces, counted by the mpi4py "
                     "backend, = `Trainer.allreduce_per_update`",
                     "equal, one allreduce per 32 MiB of sums",
                     "; ".join(f"d = {m['width']}: {a:,.0f} vs {b:,} in "
                               f"{m['allreduces_per_update']:.0f}"
                               for m, (a, b) in zip(messages, counted)), agree),
        common.check("sparse exchange: cases (T, N) where an allgather of the window's "
                     "distinct rows sends fewer bytes per rank than the dense ring allreduce",
                     "—", sparse_wins(sizes, windows, messages, rows), None),
    ]


def measure(sizes: dict, smoke: bool, repeats: int) -> tuple[str | None, list[dict]]:
    """(the link the updates were timed on, or None; the measured messages)."""
    if smoke:
        return slow_link.SMOKE_LINK, measured_messages(sizes, timed_updates=TIMED_UPDATES["smoke"])
    link, rate = TIMED_LINK
    try:
        with slow_link.rate_limited_namespace(rate) as prefix:
            return link, measured_messages(sizes, prefix, TIMED_UPDATES["full"], repeats)
    except slow_link.NamespaceUnavailable as reason:
        print(f"sparse_exchange: updates not timed: {reason}")
        return None, measured_messages(sizes)


def measured_rows(messages: list[dict], rows_sent: list[dict], link: str | None) -> str:
    """The two exchanges as measured on two workers, per width."""
    def seconds(d, r):
        if link is None:
            return ""
        dense, rows = (common.Summary(**m["seconds_per_update"]) for m in (d, r))
        return (f"; seconds per update at {link}, median (min–max) of {dense.runs}: "
                f"dense {dense.format(3)}, rows {rows.format(3)}, "
                f"{dense.median / rows.median:.1f}× faster")

    return "Measured on 2 workers (uniform random tokens; a window of 64 reviews × the model's " \
        f"{SEQUENCE_LENGTH} tokens), bytes per rank per update: " + "; ".join(
            f"d = {d['width']}: dense {d['bytes_per_update']:,.0f} B in 1 allreduce, rows "
            f"{r['bytes_per_update']:,.0f} B ({r['allgather_bytes_per_update']:,.0f} B of "
            f"{' and '.join(f'{u:,}' for u in r['distinct_rows_per_window'])} distinct rows in "
            f"{r['allgathers_per_update']:g} allgather, the rest in {r['allreduces_per_update']:g} "
            f"allreduce), {d['bytes_per_update'] / r['bytes_per_update']:.1f}× fewer"
            + seconds(d, r) for d, r in zip(messages, rows_sent)) + "."


def rows_checks(sizes: dict, messages: list[dict], rows_sent: list[dict], link: str | None
                ) -> list[dict]:
    """The row exchange's bytes against what its rows and the dense message say they are."""
    def agree(m):
        table_bytes = VALUE_BYTES * sizes["vocabulary"] * m["width"]
        return (m["allgather_bytes_per_update"] == m["expected_allgather_bytes"]
                and m["bytes_per_update"] - m["allgather_bytes_per_update"]
                == m["trainer_allreduce_per_update"][1] - table_bytes
                and m["allreduces_per_update"] == m["allgathers_per_update"] == 1)

    return [
        common.check("sparse exchange with rows: bytes one update sends, counted by the mpi4py "
                     "backend, = 4 + (4 + 4d) per distinct token of the rank's window, in one "
                     "allgather, + `allreduce_per_update` less the table, in one allreduce",
                     "equal", "; ".join(
                         f"d = {m['width']}: {m['allgather_bytes_per_update']:,.0f} vs "
                         f"{m['expected_allgather_bytes']:,.0f}" for m in rows_sent),
                     all(agree(m) for m in rows_sent)),
        common.check("sparse exchange, measured on 2 workers: bytes per update, rows ÷ dense",
                     "< 1", "; ".join(f"d = {r['width']}: "
                                      f"{r['bytes_per_update'] / d['bytes_per_update']:.3f}"
                                      for d, r in zip(messages, rows_sent)),
                     all(r["bytes_per_update"] < d["bytes_per_update"]
                         for d, r in zip(messages, rows_sent))),
    ] + ([] if link is None else [
        common.check(f"sparse exchange, measured on 2 workers at {link}: seconds per update, "
                     "rows ÷ dense (medians)", "< 1", "; ".join(
                         f"d = {r['width']}: {_seconds(r) / _seconds(d):.3f}"
                         for d, r in zip(messages, rows_sent)),
                     None if link == slow_link.SMOKE_LINK else all(
                         _seconds(r) < _seconds(d) for d, r in zip(messages, rows_sent)))])


def _seconds(message: dict) -> float:
    return message["seconds_per_update"]["median"]


def plot(sizes: dict, windows: dict, messages: list[dict], rows: dict) -> dict:
    message, s = messages[-1], EXPONENTS[0]
    ranks = list(sizes["ranks"])
    series = [{"label": "dense ring allreduce", "x": ranks, "style": "ks-",
               "y": [per_rank(message, sizes["vocabulary"], n, 0)["dense"] / 1e6 for n in ranks]}]
    series += [{"label": f"sparse allgather, T = {tokens:,}", "x": ranks, "style": "o--",
                "y": [per_rank(message, sizes["vocabulary"], n, rows[tokens, s].median)["sparse"]
                      / 1e6 for n in ranks]}
               for tokens in windows]
    return {"kind": "lines", "xlabel": "ranks N", "ylabel": "MB sent per rank per update",
            "title": f"9. Sparse exchange, V = {sizes['vocabulary']:,}, d = {message['width']}, "
                     f"s = {s}", "log": True, "series": series}


def main() -> None:
    args = common.parse_arguments(__doc__, default_repeats=5)
    sizes, windows = (SMOKE, SMOKE_WINDOWS) if args.smoke else (FULL, FULL_WINDOWS)
    link, measured = measure(sizes, args.smoke, args.repeats)
    messages = [m for m in measured if not m["row_exchange"]]
    rows_sent = [m for m in measured if m["row_exchange"]]
    rows = {(tokens, s): distinct_rows(sizes["vocabulary"], s, tokens, sizes["samples"])
            for tokens in windows for s in EXPONENTS}
    figure = (sizes, windows, messages, rows)
    common.emit({
        "figure": "sparse_exchange", "smoke": args.smoke,
        "title": "9. Sparse exchange: the dense table vs the window's rows",
        "how": __doc__.split("\n\n", 1)[1].strip(),
        "table": measured_rows(messages, rows_sent, link) + "\n\n" + table(*figure),
        "checks": checks(*figure) + rows_checks(sizes, messages, rows_sent, link),
        "plots": [plot(*figure)], "messages": messages, "rows_sent": rows_sent,
        "distinct_rows": [{"tokens": tokens, "exponent": s, **rows[tokens, s].as_dict()}
                          for tokens, s in rows],
    }, args.json)


if __name__ == "__main__":
    common.run_main("sparse_exchange", main)
