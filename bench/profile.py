"""Summarize py-spy ``--format raw`` (collapsed stacks) files: ``python -m bench.profile FILE...``.

Prints, per file, the frames with the most samples on top of the stack (self) and anywhere in the
stack (inclusive), as a share of all samples. ``python -m bench --profile DIR`` records one such
file per scenario (regproxy only) and writes this summary next to each as ``NAME.top.txt``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

#: Frames every sample of the main thread has; they say nothing.
_BORING = ("_run_module_as_main", "_run_code", "<module>", "run_app", "cmd_serve", "main (")


def summarize(path: Path, top: int = 25) -> str:
    self_count: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_count[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if total == 0:
        return f"{path}: no samples\n"
    out = [f"{path.name}: {total} samples", "", "self:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in self_count.most_common(top)]
    out += ["", "inclusive:"]
    shown = 0
    for frame, n in inclusive.most_common():
        if frame.startswith(_BORING) or frame.startswith("Thread"):
            continue
        out.append(f"  {n / total:6.1%}  {frame}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    for name in sys.argv[1:] if argv is None else argv:
        print(summarize(Path(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
