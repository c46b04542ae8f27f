"""``python -m benchmarks.rank_entry DIR ARGS...``: ``fdcr-mpi ARGS`` that leaves its peak memory in DIR.

Every rank (or the one process) runs the CLI, then writes ``DIR/rss_rank<r>.json`` with its
peak resident set size (``resource.getrusage`` ru_maxrss), so a benchmark learns the peak
memory of each rank of a real run.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from fdcr_mpi.cli import env_rank
from fdcr_mpi.cli import main as cli_main


def write_peak(folder: Path, rank: int, code: int) -> None:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (folder / f"rss_rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mib": peak_mib,
                                                             "exit_code": code}))


def read_peaks(folder: Path) -> dict[int, float]:
    """Rank -> peak MiB from the files a run left in ``folder``."""
    peaks = {}
    for path in sorted(folder.glob("rss_rank*.json")):
        data = json.loads(path.read_text())
        peaks[int(data["rank"])] = float(data["peak_rss_mib"])
    return dict(sorted(peaks.items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    code = cli_main(argv[1:])
    write_peak(folder, env_rank(), code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
