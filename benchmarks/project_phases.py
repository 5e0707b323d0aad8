"""Project a run's phase times onto a machine that ran only part of it, by measured per-phase ratios.

    python benchmarks/project_phases.py --run FULL.json --ref-here PART_A.json --ref-there PART_B.json \
        [--like "legal_family: multi-task LoRA=zoo + conditions (all tasks)"] [--out FILE]

``FULL.json`` is a ``phases.json`` of a complete run on machine A (``make openworld`` writes one under
its runs folder). ``PART_A.json`` and ``PART_B.json`` are the phase times of one same code version
run on machine A and on machine B, however far each got. Each phase of the full run is scaled by
B / A of the reference phase of its kind: the same name, else the same part after the fold name
(``generators``, ``multi-task LoRA``, ``scoring``), unless ``--like`` names the reference phase
(a phase whose work resembles another's more than its namesake's). The result is an estimate: it
assumes each phase's work scales between the two machines as its reference did, and says which
reference each phase used. Markdown to ``--out`` and stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from icm_lora import files


def kind(phase: str) -> str:
    """``"fold: generators"`` -> ``"generators"``; a phase without a fold is its own kind."""
    return phase.split(": ", 1)[1] if ": " in phase else phase


def ratios(here: dict[str, float], there: dict[str, float]) -> dict[str, tuple[float, str]]:
    """Kind (and full name) -> (B / A, the reference phase) over the phases both machines reached.
    A kind's first common phase is its reference, so the later, partial last phase of a stopped
    run is not used."""
    common = [p for p in here if p in there and here[p] > 0]
    if not common:
        raise ValueError("the two reference runs share no phase")
    out: dict[str, tuple[float, str]] = {}
    for p in common:
        out.setdefault(p, (there[p] / here[p], p))
        out.setdefault(kind(p), (there[p] / here[p], p))
    return out


def project(run: dict[str, float], refs: dict[str, tuple[float, str]], like: dict[str, str]) -> list[tuple]:
    """(phase, seconds on A, ratio, reference, projected seconds on B) for every phase of ``run``."""
    rows = []
    for phase, seconds in run.items():
        key = like.get(phase, phase if phase in refs else kind(phase))
        if key not in refs:
            raise ValueError(f"phase {phase!r}: no reference phase of its kind ({key!r}); name one with --like")
        ratio, ref = refs[key]
        rows.append((phase, seconds, ratio, ref, seconds * ratio))
    return rows


def table(rows: list[tuple], sources: str) -> str:
    lines = [f"Projection of {sources}", "",
             "| phase | s, measured | ratio | reference phase | s, projected |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {s:,.0f} | {r:.2f} | {ref} | {t:,.0f} |" for p, s, r, ref, t in rows]
    measured, projected = sum(r[1] for r in rows), sum(r[4] for r in rows)
    lines.append(f"| **total** | **{measured:,.0f}** | {projected / measured:.2f} | | **{projected:,.0f} "
                 f"({projected / 3600:.2f} h)** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="phases.json of the full run on machine A")
    parser.add_argument("--ref-here", type=Path, required=True, help="reference phases on machine A")
    parser.add_argument("--ref-there", type=Path, required=True, help="the same code's phases on machine B")
    parser.add_argument("--like", action="append", default=[], metavar="PHASE=REFERENCE",
                        help="scale PHASE by REFERENCE's ratio (a phase name or kind of the reference runs)")
    parser.add_argument("--out", type=Path, help="markdown file to write (atomically)")
    args = parser.parse_args()
    like = dict(item.split("=", 1) for item in args.like)
    run, here, there = (files.read_json(p) for p in (args.run, args.ref_here, args.ref_there))
    text = table(project(run, ratios(here, there), like),
                 f"`{args.run}` by the ratios of `{args.ref_there}` to `{args.ref_here}`.")
    print(text)
    if args.out:
        files.write_text(args.out, text)


if __name__ == "__main__":
    main()
