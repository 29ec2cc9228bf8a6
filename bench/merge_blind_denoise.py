"""Join bench/blind_denoise.py runs split by arm and seed into one result (per site: each
method's mean and std over seeds, per-seed dp - gaussian PSNR).

    python -m bench.merge_blind_denoise --seeds 3 [--arms dp,gaussian] [--name blind_denoise]

reads bench/results/blind_denoise_<arm>_seed<k>.json (each written by
``python -m bench.blind_denoise ... --arms <arm> --seeds 1 --first-seed <k> --name blind_denoise_<arm>_seed<k>``;
the classical rows come from seed 0's files) and writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json

from bench.blind_denoise import site_facts, summarise
from bench.common import RESULTS, write_result
from medgen.config import RunConfig

PER_SEED_KEYS = ("psnr_std", "ssim_std", "seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default="dp,gaussian")
    parser.add_argument("--name", default="blind_denoise")
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    parts = {(arm, k): json.loads((RESULTS / f"blind_denoise_{arm}_seed{k}.json").read_text())
             for arm in arms for k in range(args.seeds)}
    first = parts[(arms[0], 0)]
    sites = list(first["per_site"])
    per_seed = []
    for k in range(args.seeds):
        seed = {}
        for site in sites:
            rows = {}
            for arm in arms:
                for name, row in parts[(arm, k)]["per_site"][site]["methods"].items():
                    if name in arms or k == 0 or name not in rows:
                        rows[name] = {key: v for key, v in row.items() if key not in PER_SEED_KEYS}
            seed[site] = rows
        per_seed.append(seed)
    classical = {name: row for name, row in per_seed[0][sites[0]].items() if name not in arms}
    for k in range(1, args.seeds):  # the classical rows are deterministic: seed 0's
        for site in sites:
            per_seed[k][site] = {n: r for n, r in per_seed[k][site].items() if n in arms}
    facts = site_facts(RunConfig.from_run_config(first["config"]), int(first["per_site"][sites[0]]["methods"]["dp" if "dp" in arms else arms[0]]["n"]))
    per_site = {site: summarise(facts[site], [s[site] for s in per_seed], arms) for site in sites}
    for site in sites:  # classical rows once (seed 0), every arm averaged over the seeds
        per_site[site]["methods"] = {**{n: per_seed[0][site][n] for n in classical}, **{
            n: per_site[site]["methods"][n] for n in arms}}
    write_result(args.name, {"commands": {f"{arm}-seed{k}": p["command"] for (arm, k), p in parts.items()},
                             "federation": first["federation"], "config": first["config"],
                             "training": {f"{arm}-seed{k}": p["training"] for (arm, k), p in parts.items()},
                             "per_site": per_site, "seeds": list(range(args.seeds)), "unit": first["unit"],
                             "accountant": first["accountant"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
