"""The README's tables from the probe reports in this folder: python docs/results/proxy-probe/summarize.py"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = ("greats-1240", "greats-1234", "crawl-greats-1243")
VIEWS = ("all", "all+adam", "scored+adam", "window")


def main():
    reports = {name: json.loads((HERE / f"{name}.json").read_text()) for name in RUNS}
    print("| run | view | part | P/R V_step | P/R S | P/R V | lift V_step | lift S | lift V | lift_tgt V_step | "
          "lift_tgt S | lift_tgt V | cos(V_step, V) | cos(S, V) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in reports.items():
        for view in VIEWS:
            for part in ("all", "early", "late"):
                e = r["summary"][view][part]
                cells = [f"{e['ratio_P_R'][x]:.2f}" for x in ("V_step", "S", "V")]
                cells += [f"{e[m][x]:.3f}" for m in ("lift", "lift_tgt") for x in ("V_step", "S", "V")]
                cells += [f"{e['targets_cos']['V_step~V']:.2f}", f"{e['targets_cos']['S~V']:.2f}"]
                print(f"| {name} | {view} | {part} | " + " | ".join(cells) + " |")
    print()
    print("| run | python_docs share: picks / candidates (mean over measured steps) | steps where lift V_step > lift V "
          "(window / all+adam) | steps where lift_tgt V < 0 (all / all+adam) |")
    print("|---|---|---|---|")
    for name, r in reports.items():
        tgt, steps = r["target_domain"], r["steps"]
        picks = sum(s["shares"]["selected"][tgt] for s in steps) / len(steps)
        cands = sum(s["shares"]["candidates"][tgt] for s in steps) / len(steps)
        above = [sum(s["views"][v]["lift"]["V_step"] > s["views"][v]["lift"]["V"] for s in steps)
                 for v in ("window", "all+adam")]
        worse = [sum(s["views"][v]["lift_tgt"]["V"] is not None and s["views"][v]["lift_tgt"]["V"] < 0 for s in steps)
                 for v in ("all", "all+adam")]
        print(f"| {name} | {picks:.2f} / {cands:.2f} | {above[0]} / {above[1]} of {len(steps)} | "
              f"{worse[0]} / {worse[1]} of {len(steps)} |")


if __name__ == "__main__":
    main()
