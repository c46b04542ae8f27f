"""Every defense against every attack on a small real-data setting: the A/R/V table (issues 4, 16).

Runs ``fdcr-mpi run`` for each (defense, attack) pair, N at a time, then reads the run files and
writes ``benchmarks/results/defense_matrix.json`` and ``.md``. Not part of the tests.

    python -m benchmarks.defense_matrix --data-root ../shared/data -j 2
    python -m benchmarks.defense_matrix --only fdcr fedavg --attacks lie min_max   # some cells

A cell already finished in ``--runs`` is not run again, so the table grows over several sittings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fdcr_mpi.defenses import available
from fdcr_mpi.store import read_rounds, read_summary

SETTING = ["data.dataset=fmnist", "data.beta=0.5", "attack.malicious_ratio=0.3", "rounds=12",
           "train.local_epochs=2", "eval.test_samples=2000", "runtime.threads=1", "train.batch_clients=1"]
DESCRIPTION = ("Fashion-MNIST (real files, the whole 54,000-image client pool) over 10 clients (Dirichlet beta 0.5), "
               "30% attackers (clients 7-9), SimpleCNN, 12 rounds of 2 local epochs (the paper runs 50 of 10), "
               "test on 2,000 images; A / R / **V** = mean of the last 5 rounds, seed 0, one run each. "
               "`none`: a clean run (A only). scale3: model replacement, attackers send w_t + 3 (w_k - w_t). "
               "fisher_uniform / fisher_mimic: attackers report a constant Fisher vector / the Fisher of their "
               "clean samples; fisher_adaptive: the Fisher vector that minimises the attacker's FDCR "
               "discrepancy (attacks.adaptive_fisher, omniscient); run only against defenses that read Fisher vectors (for the others the result "
               "is the badnets one). `solid` (the full 2x6 block instead of the paper's pattern) was run for "
               "fedavg and fdcr only, to save time. The untargeted attacks (lie, min_max, min_sum, ipm, "
               "sign_flip, gaussian, label_flip) aim at A, not at the backdoor: read their A (R stays high "
               "because no trigger is planted). scaling: BadNets with model replacement by n / eta = 10. "
               "A blank cell was not run. The table grows by sittings: the cells of the first columns (none to "
               "fisher_mimic, 14 defenses) were computed in an earlier session, with the code of its time; the "
               "others (the library's defenses against badnets, fisher_adaptive, and fdcr/fedavg against the "
               "untargeted attacks) in session 7. Today's FedAvg gives 78.8 / 46.4 against badnets (rflbat and "
               "fldetector, which removed nobody in 12 rounds, equal it), the earlier cell 78.5 / 47.9. Session 8 "
               "added fdcr/fedavg against min_sum, gaussian, scaling, neurotoxin (BadNets masked off the top 1% of "
               "the benign mean update), fang (against trimmed mean), blended (a random key pattern blended at "
               "alpha 0.2), a3fl (its trigger searched each round on the server; shortened to a3fl.samples=500, "
               "a3fl.trigger_epochs=20 from the authors' 200) and chameleon (the authors' defaults), and five "
               "robust aggregators against lie and min_max. Every cell trains one client at a time "
               "(train.batch_clients=1, pinned since batched training became the default), the arithmetic of "
               "the earlier cells. Session 9 added alignins, bucketing, bulyan, centered_clipping, crfl and dnc "
               "against blended, and median, trimmed_mean, multi_krum, flame and signguard against label_flip, "
               "min_sum, sign_flip and gaussian (deepsight against blended ran over an hour and was cut short). "
               "Session 10 added the library's defenses against scale3 and dba (alignins, bucketing, "
               "centered_clipping, flame, fldetector, krum, median, norm_clipping, rflbat, signguard, "
               "trimmed_mean, weak_dp), 19 defenses against lie (all but deepsight), and alignins, bucketing, "
               "bulyan and centered_clipping against min_max and ipm, with crfl, dnc and finetuning against ipm "
               "(54 cells, 192 in all). Session 11 added 66 cells (258 in all): deepsight against scale3, dba, lie, "
               "min_max, ipm and blended (8-10 minutes a cell, since models/pooling.py made its division differences "
               "twice as fast), the library's defenses against scaling (24), neurotoxin and label_flip (11 and 10, "
               "alignins to foolsgold in alphabetical order), 12 more against ipm, and crfl, dnc and finetuning "
               "against min_max.")
LOSSES = ("FDCR's figure per attack against FedAvg's (no defense) and the best defense run in that column: V "
          "(mean of A and R) for a backdoor, A for an untargeted attack. 'worse' / 'better': by more than one point. "
          "Computed from the cells above (one seed, 12 short rounds): a difference of a few points is within the "
          "noise of one run.")
ATTACKS: dict[str, list[str]] = {
    "none": ["attack.kind=none"],
    "badnets": [],
    "solid": ["trigger.pattern=solid"],
    "dba": ["attack.kind=dba"],
    "scale3": ["attack.scale=3"],
    "fisher_uniform": ["attack.fisher=uniform"],
    "fisher_mimic": ["attack.fisher=mimic"],
    "fisher_adaptive": ["attack.fisher=adaptive"],
    "scaling": ["attack.kind=scaling"],
    "lie": ["attack.kind=lie"],
    "min_max": ["attack.kind=min_max"],
    "min_sum": ["attack.kind=min_sum"],
    "ipm": ["attack.kind=ipm"],
    "sign_flip": ["attack.kind=sign_flip"],
    "gaussian": ["attack.kind=gaussian"],
    "label_flip": ["attack.kind=label_flip"],
    "neurotoxin": ["attack.kind=neurotoxin"],
    "fang": ["attack.kind=fang"],
    "blended": ["attack.kind=blended"],
    "a3fl": ["attack.kind=a3fl", "a3fl.samples=500", "a3fl.trigger_epochs=20"],
    "chameleon": ["attack.kind=chameleon"],
}
FISHER_ONLY = {"fisher_uniform", "fisher_mimic", "fisher_adaptive"}  # forged Fisher vectors matter only to defenses that read them
CLEAN_ONLY = {"fedavg", "fdcr"}  # clean runs (attack none), for the accuracy a defense costs
SOLID_ONLY = {"fedavg", "fdcr"}  # the solid trigger differs from badnets by its pixels only (time)
RUN_ORDER = ["badnets", "fisher_adaptive", "scale3", "fisher_uniform", "fisher_mimic", "none", "dba", "solid", "lie", "min_max",
             "ipm", "sign_flip", "label_flip", "min_sum", "gaussian", "scaling", "neurotoxin", "fang", "blended",
             "a3fl", "chameleon"]


def pairs() -> list[tuple[str, str]]:
    """Every (defense, attack) cell, attack by attack, so that a cut-short run still has whole columns."""
    out = []
    for attack in RUN_ORDER:
        for name, cls in available().items():
            if attack in FISHER_ONLY and not cls.needs_fisher:
                continue
            if (attack == "none" and name not in CLEAN_ONLY) or (attack == "solid" and name not in SOLID_ONLY):
                continue
            out.append((name, attack))
    return out


def run_one(name: str, attack: str, root: Path, data_root: str, kept: set[tuple[str, str]]) -> dict | None:
    out = root / f"{name}__{attack}"
    if (name, attack) in kept or collect_one(name, attack, root) is not None:
        return None  # finished in an earlier sitting (committed, or its run directory is here)
    args = [sys.executable, "-m", "fdcr_mpi", "run", *SETTING, *ATTACKS[attack], f"defense.name={name}",
            f"data.root={data_root}", "--quiet", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"defense": name, "attack": attack, "error": done.stderr.strip().splitlines()[-1:]}
    return collect_one(name, attack, root)


def collect_one(name: str, attack: str, root: Path) -> dict | None:
    """The figures of a finished run (None when it has not finished)."""
    path = root / f"{name}__{attack}" / "run.h5"
    if not path.is_file() or read_summary(path).get("status") != "complete":
        return None
    rounds = read_rounds(path)
    last = lambda key: float(np.nanmean(rounds[key][-5:]))  # noqa: E731
    return {"defense": name, "attack": attack, "A": last("A"), "R": last("R"), "V": last("V"),
            "tpr": last("tpr"), "fpr": last("fpr"), "seconds": float(np.nansum(rounds["seconds_round"]))}


UNTARGETED = {"lie", "min_max", "min_sum", "ipm", "sign_flip", "gaussian", "label_flip", "fang"}  # judged by A


def where_fdcr_loses(results: list[dict]) -> str:
    """Per attack FDCR faced: its figure (V for a backdoor, A for an untargeted attack) against
    FedAvg's (no defense) and the best defense of the column, computed from the cells."""
    cell = {(r["defense"], r["attack"]): r for r in results if "error" not in r}
    lines = ["| attack | judged by | fdcr | fedavg | best defense in the column | fdcr against no defense |",
             "|---|---|---:|---:|---|---|"]
    for attack in ATTACKS:
        if attack == "none" or ("fdcr", attack) not in cell:
            continue
        key = "A" if attack in UNTARGETED else "V"
        column = {d: r[key] for (d, a), r in cell.items() if a == attack}
        if attack in FISHER_ONLY:  # a forged Fisher vector changes only the defenses that read one
            column = {**{d: r[key] for (d, a), r in cell.items() if a == "badnets"}, **column}
        best = max(column, key=column.get)
        ours, base = column["fdcr"], column.get("fedavg")
        verdict = "—" if base is None else ("worse" if ours < base - 1 else "better" if ours > base + 1 else "within 1")
        lines.append(f"| {attack} | {key} | {ours:.1f} | {'' if base is None else f'{base:.1f}'} | "
                     f"{best} {column[best]:.1f} (of {len(column)}) | {verdict} |")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in results)]
    cell = {(r["defense"], r["attack"]): r for r in results}
    lines = ["| defense | " + " | ".join(attacks) + " |", "|---|" + "---:|" * len(attacks)]
    for name in available():
        row = []
        for attack in attacks:
            r = cell.get((name, attack))
            if r is None:
                row.append("= badnets" if attack in FISHER_ONLY else "")
            elif "error" in r:
                row.append("error")
            elif attack == "none":
                row.append(f"A {r['A']:.1f}")
            else:
                row.append(f"{r['A']:.1f} / {r['R']:.1f} / **{r['V']:.1f}**")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--runs", type=Path, default=Path("runs/defense_matrix"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--collect", action="store_true", help="only tabulate the runs already finished")
    parser.add_argument("--only", nargs="*", help="run only these defenses (the table still lists all)")
    parser.add_argument("--attacks", nargs="*", help="run only these attacks (columns)")
    parser.add_argument("--redo", action="store_true", help="run again the cells the committed table holds")
    args = parser.parse_args()
    todo = pairs()
    if args.only:
        todo = [p for p in todo if p[0] in args.only]
    if args.attacks:
        todo = [p for p in todo if p[1] in args.attacks]
    kept = set() if args.redo else {(r["defense"], r["attack"]) for r in committed(args.out) if "error" not in r}
    if not args.collect:
        with ThreadPoolExecutor(args.jobs) as pool:
            for done in pool.map(lambda p: run_one(*p, args.runs, args.data_root, kept), todo):
                if done is not None and "error" in done:
                    print(f"{done['defense']} x {done['attack']} failed: {done['error']}", file=sys.stderr)
                write_tables(args.runs, args.out, complete=False)
    print(write_tables(args.runs, args.out, complete=len(collected(args.runs)) == len(pairs())))
    return 0


def collected(runs: Path) -> list[dict]:
    return [r for r in (collect_one(*p, runs) for p in pairs()) if r is not None]


def committed(out: Path) -> list[dict]:
    """The cells of the committed table (earlier sittings, whose run directories may be gone)."""
    path = out / "defense_matrix.json"
    return json.loads(path.read_text())["results"] if path.is_file() else []


def write_tables(runs: Path, out: Path, complete: bool) -> str:
    """Write defense_matrix.json and .md from the finished runs and the committed cells they do not
    redo; returns the table."""
    fresh = collected(runs)
    done = {(r["defense"], r["attack"]) for r in fresh}
    results = [r for r in committed(out) if (r["defense"], r["attack"]) not in done and "error" not in r] + fresh
    complete = complete or {(r["defense"], r["attack"]) for r in results} >= set(pairs())
    out.mkdir(parents=True, exist_ok=True)
    (out / "defense_matrix.json").write_text(json.dumps({"setting": SETTING, "results": results}, indent=1))
    title = "Every defense against every attack" + ("" if complete else " (PARTIAL: blank cells were not run)")
    table = markdown(results)
    summary = where_fdcr_loses(results)
    (out / "defense_matrix.md").write_text(f"# {title}\n\n{DESCRIPTION}\n\n{table}\n\n## Where FDCR loses\n\n"
                                           f"{LOSSES}\n\n{summary}\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
